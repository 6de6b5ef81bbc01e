//! Background jobs that are not messages (today: the Aircall insight card push): rows claimed
//! with a lease like the outbox, retried with backoff, failed with the reason after the last
//! attempt. A job is unique per kind and dedupe key, so redelivered webhooks do not repeat it.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::AppState;
use crate::tenancy::TenantId;

/// Queues a job unless one with the same kind and key exists.
pub async fn enqueue(
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
        sqlx::query("SELECT pg_notify('rapport_jobs', '')")
            .execute(conn)
            .await?;
    }
    Ok(done.rows_affected() == 1)
}

/// A claimed job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub kind: String,
    pub payload: Value,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Why a job did not succeed.
#[derive(Debug, Clone)]
pub enum JobError {
    Retry(String),
    Fail(String),
}

async fn claim(pool: &PgPool, batch: i64) -> Result<Vec<Job>, sqlx::Error> {
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

async fn finish(
    pool: &PgPool,
    job: &Job,
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

async fn run_job(state: &AppState, job: &Job) -> Result<(), JobError> {
    match job.kind.as_str() {
        crate::telephony::insight::KIND => crate::telephony::insight::push(state, job).await,
        other => Err(JobError::Fail(format!("unknown job kind `{other}`"))),
    }
}

/// Runs the due jobs once; the number run.
pub async fn run_due(state: &AppState) -> Result<usize, sqlx::Error> {
    let jobs = claim(&state.pool, 20).await?;
    for job in &jobs {
        let outcome = run_job(state, job).await;
        if let Err(JobError::Retry(e) | JobError::Fail(e)) = &outcome {
            tracing::warn!(job = %job.id, kind = %job.kind, error = %e, "job did not succeed");
        }
        finish(&state.pool, job, outcome).await?;
    }
    Ok(jobs.len())
}

/// Runs jobs until `shutdown`, polling every second.
pub async fn run(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        match run_due(&state).await {
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %crate::error::error_chain(&e), "job round failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
