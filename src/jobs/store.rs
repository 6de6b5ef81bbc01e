//! SQL for the `jobs` table: insert (deduplicated), claim with a lease, record the outcome.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::JobError;
use crate::domain::TenantId;

/// The channel `insert` notifies at commit; the job runner listens on it.
pub const NOTIFY_CHANNEL: &str = "rapport_jobs";

/// Queues a job unless one with the same kind and key exists; whether it was queued.
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
    dedupe_key: &str,
    payload: &Value,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO jobs (tenant_id, id, kind, dedupe_key, payload, status, max_attempts)
         VALUES ($1, $2, $3, $4, $5, 'queued', 6) ON CONFLICT (tenant_id, kind, dedupe_key) DO NOTHING",
    )
    .bind(tenant)
    .bind(Uuid::now_v7())
    .bind(kind)
    .bind(dedupe_key)
    .bind(payload)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 1 {
        crate::db::notify(conn, NOTIFY_CHANNEL).await?;
    }
    Ok(done.rows_affected() == 1)
}

/// A job claimed by a runner, leased for 60 seconds.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub kind: String,
    pub payload: Value,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Claims up to `batch` due jobs (and those whose runner died holding them).
pub async fn claim(pool: &PgPool, batch: i64) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE jobs j SET status = 'running', attempts = j.attempts + 1, locked_until = now() + interval '60 seconds', updated_at = now()
         WHERE (j.tenant_id, j.id) IN (
            SELECT tenant_id, id FROM jobs
             WHERE (status = 'queued' AND next_attempt_at <= now()) OR (status = 'running' AND locked_until < now())
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING j.tenant_id, j.id, j.kind, j.payload, j.attempts, j.max_attempts",
    )
    .bind(batch)
    .fetch_all(pool)
    .await
}

/// Records a run's outcome: done, failed, or queued again after a backoff.
pub async fn record_outcome(
    pool: &PgPool,
    job: &ClaimedJob,
    outcome: Result<(), JobError>,
) -> Result<(), sqlx::Error> {
    let (status, error, delay) = match outcome {
        Ok(()) => ("done", None, 0.0),
        Err(JobError::Fail(e)) => ("failed", Some(e), 0.0),
        Err(JobError::Retry(e)) if job.attempts >= job.max_attempts => (
            "failed",
            Some(format!("gave up after {} attempts: {e}", job.attempts)),
            0.0,
        ),
        Err(JobError::Retry(e)) => (
            "queued",
            Some(e),
            crate::domain::backoff(job.attempts, None).as_secs_f64(),
        ),
    };
    sqlx::query(
        "UPDATE jobs SET status = $4, last_error = $5, locked_until = NULL, updated_at = now(),
            next_attempt_at = now() + make_interval(secs => $6)
         WHERE tenant_id = $1 AND id = $2 AND attempts = $3 AND status = 'running'",
    )
    .bind(job.tenant_id)
    .bind(job.id)
    .bind(job.attempts)
    .bind(status)
    .bind(error)
    .bind(delay)
    .execute(pool)
    .await?;
    Ok(())
}
