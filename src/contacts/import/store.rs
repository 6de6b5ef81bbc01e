//! SQL for `contact_imports` and `contact_import_chunks`: the upload's rows, the workers'
//! claims and leases, each chunk's transaction, and the API's view.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{ContactImport, ImportFormat, ImportMode, ImportOptions, ImportStatus, NOTIFY_CHANNEL};
use crate::domain::TenantId;

const VIEW: &str = "SELECT id, filename, format, mode, dry_run, status,
            rows_total AS rows, rows_done AS processed, created, updated, unchanged, skipped,
            failed, errors, error, created_at, started_at, finished_at
       FROM contact_imports";

/// One import as the API shows it.
pub async fn fetch(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<ContactImport>, sqlx::Error> {
    let found: Option<ContactImport> =
        sqlx::query_as(&format!("{VIEW} WHERE tenant_id = $1 AND id = $2"))
            .bind(tenant)
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(found.map(ContactImport::by_line))
}

/// The tenant's imports, newest first, before the cursor.
pub async fn list(
    pool: &PgPool,
    tenant: TenantId,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ContactImport>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{VIEW} WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3"
    ))
    .bind(tenant)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map(|all: Vec<ContactImport>| all.into_iter().map(ContactImport::by_line).collect())
}

/// The import an `Idempotency-Key` started, and where it stands.
pub async fn by_key(
    pool: &PgPool,
    tenant: TenantId,
    key: &str,
) -> Result<Option<(Uuid, ImportStatus)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, status FROM contact_imports WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(tenant)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// A new import, `receiving` until `deadline_secs` from now.
pub async fn insert_receiving(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    opts: &ImportOptions,
    deadline_secs: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contact_imports (tenant_id, id, filename, format, mode, dry_run,
                                      idempotency_key, status, locked_until)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'receiving', now() + make_interval(secs => $8))",
    )
    .bind(tenant)
    .bind(id)
    .bind(&opts.filename)
    .bind(opts.format)
    .bind(opts.mode)
    .bind(opts.dry_run)
    .bind(&opts.idempotency_key)
    .bind(deadline_secs as f64)
    .execute(pool)
    .await?;
    Ok(())
}

/// One chunk of an upload.
pub async fn insert_chunk(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    seq: i32,
    chunk: &super::receive::Chunk,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contact_import_chunks (tenant_id, import_id, part, seq, lines, body)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant)
    .bind(id)
    .bind(chunk.part)
    .bind(seq)
    .bind(&chunk.lines)
    .bind(&chunk.body)
    .execute(pool)
    .await?;
    Ok(())
}

/// The whole file is in: queued for the workers (woken at commit), or completed when it had
/// no rows.
pub async fn finish_receiving(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    columns: Option<Value>,
    rows: i64,
    delimiter: Option<String>,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query(
        "UPDATE contact_imports
            SET columns = $3, rows_total = $4, delimiter = $5, locked_until = NULL,
                status = CASE WHEN $4 = 0 THEN 'completed' ELSE 'queued' END,
                finished_at = CASE WHEN $4 = 0 THEN now() END
          WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .bind(columns)
    .bind(rows)
    .bind(delimiter)
    .execute(&mut *tx)
    .await?;
    crate::db::notify(&mut *tx, NOTIFY_CHANNEL).await?;
    tx.commit().await
}

/// Deletes an upload that did not finish (its chunks go with it).
pub async fn delete_unfinished(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM contact_imports WHERE tenant_id = $1 AND id = $2 AND status = 'receiving'",
    )
    .bind(tenant)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes uploads left `receiving` past their deadline by a process that died; how many.
pub async fn sweep_abandoned(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM contact_imports WHERE status = 'receiving' AND locked_until < now()",
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// An import a worker holds.
#[derive(Debug, sqlx::FromRow)]
pub struct Claimed {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub filename: Option<String>,
    pub format: ImportFormat,
    pub mode: ImportMode,
    pub dry_run: bool,
    pub columns: Option<Value>,
    pub delimiter: Option<String>,
}

/// The queued or running import that waited longest for its turn (or the one named), unless
/// another worker holds it; held by `holder` for `lease_secs`.
pub async fn claim(
    pool: &PgPool,
    holder: Uuid,
    lease_secs: f64,
    only: Option<(TenantId, Uuid)>,
) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE contact_imports i
            SET holder = $1, locked_until = now() + make_interval(secs => $2),
                status = 'running', started_at = coalesce(i.started_at, now())
          WHERE (i.tenant_id, i.id) = (
                SELECT tenant_id, id FROM contact_imports
                 WHERE status IN ('queued', 'running')
                   AND (locked_until IS NULL OR locked_until < now())
                   AND ($3::uuid IS NULL OR (tenant_id = $3 AND id = $4))
                 ORDER BY served_at NULLS FIRST, created_at
                 LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING i.tenant_id, i.id, i.filename, i.format, i.mode, i.dry_run, i.columns,
                   i.delimiter",
    )
    .bind(holder)
    .bind(lease_secs)
    .bind(only.map(|(t, _)| t))
    .bind(only.map(|(_, id)| id))
    .fetch_optional(pool)
    .await
}

/// A failed attempt at a chunk: the lease given up until a backoff of 5, 10, 20, 40 s has
/// passed; failed at the `max_failures`th in a row (its chunks dropped). Whether it failed.
pub async fn record_failure(
    pool: &PgPool,
    import: &Claimed,
    holder: Uuid,
    message: &str,
    max_failures: i32,
) -> Result<bool, sqlx::Error> {
    let failed: Option<bool> = sqlx::query_scalar(
        "UPDATE contact_imports
            SET failures = failures + 1, error = $4, holder = NULL,
                locked_until = now() + make_interval(secs => 5 * power(2, failures)),
                status = CASE WHEN failures + 1 >= $5 THEN 'failed' ELSE status END,
                finished_at = CASE WHEN failures + 1 >= $5 THEN now() END
          WHERE tenant_id = $1 AND id = $2 AND holder = $3
      RETURNING status = 'failed'",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(holder)
    .bind(message)
    .bind(max_failures)
    .fetch_optional(pool)
    .await?;
    if failed == Some(true) {
        delete_chunks(pool, import.tenant_id, import.id).await?;
    }
    Ok(failed == Some(true))
}

/// Drops every chunk left of an import.
pub async fn delete_chunks(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contact_import_chunks WHERE tenant_id = $1 AND import_id = $2")
        .bind(tenant)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Completes the import if `holder` holds it and no chunk is left; whether it did.
pub async fn complete(pool: &PgPool, import: &Claimed, holder: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE contact_imports
            SET status = 'completed', finished_at = now(), holder = NULL,
                locked_until = NULL, failures = 0, error = NULL
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'
            AND NOT EXISTS (SELECT 1 FROM contact_import_chunks
                             WHERE tenant_id = $1 AND import_id = $2)",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the import back to the queue, behind those that waited longer.
pub async fn release(pool: &PgPool, import: &Claimed, holder: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE contact_imports SET holder = NULL, locked_until = NULL, served_at = now()
          WHERE tenant_id = $1 AND id = $2 AND holder = $3",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// The part's next chunk, locked for the transaction: (seq, lines, body).
pub async fn next_chunk(
    conn: &mut PgConnection,
    import: &Claimed,
    part: i16,
) -> Result<Option<(i32, Vec<i64>, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, lines, body FROM contact_import_chunks
          WHERE tenant_id = $1 AND import_id = $2 AND part = $3
          ORDER BY seq LIMIT 1 FOR UPDATE",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(part)
    .fetch_optional(conn)
    .await
}

/// How many failed rows the import lists, if `holder` still holds it running.
pub async fn errors_listed(
    conn: &mut PgConnection,
    import: &Claimed,
    holder: Uuid,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT jsonb_array_length(errors) FROM contact_imports
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(holder)
    .fetch_optional(conn)
    .await
}

/// What one chunk did, added to the import's counters.
#[derive(Debug, Default)]
pub struct Tally {
    pub rows: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub skipped: i64,
    pub failed: i64,
    pub errors: Vec<Value>,
}

/// Deletes the chunk and adds its tally (the first `max_errors` failed rows kept), renewing
/// the lease; last in the chunk's transaction, so the import's row is locked only for the
/// commit. False when `holder` no longer holds the import running (cancelled, taken over):
/// the caller rolls back.
#[allow(clippy::too_many_arguments)]
pub async fn count_chunk(
    conn: &mut PgConnection,
    import: &Claimed,
    holder: Uuid,
    part: i16,
    seq: i32,
    tally: Tally,
    max_errors: usize,
    lease_secs: f64,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "DELETE FROM contact_import_chunks
          WHERE tenant_id = $1 AND import_id = $2 AND part = $3 AND seq = $4",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(part)
    .bind(seq)
    .execute(&mut *conn)
    .await?;
    let counted = sqlx::query(
        "UPDATE contact_imports
            SET rows_done = rows_done + $4, created = created + $5, updated = updated + $6,
                unchanged = unchanged + $7, skipped = skipped + $8, failed = failed + $9,
                errors = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]')
                            FROM jsonb_array_elements(errors || $10) WITH ORDINALITY AS x (e, n)
                           WHERE n <= $11),
                failures = 0, error = NULL,
                locked_until = now() + make_interval(secs => $12)
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'",
    )
    .bind(import.tenant_id)
    .bind(import.id)
    .bind(holder)
    .bind(tally.rows)
    .bind(tally.created)
    .bind(tally.updated)
    .bind(tally.unchanged)
    .bind(tally.skipped)
    .bind(tally.failed)
    .bind(Value::Array(tally.errors))
    .bind(max_errors as i64)
    .bind(lease_secs)
    .execute(conn)
    .await?;
    Ok(counted.rows_affected() == 1)
}

/// Cancels an import that has not finished (its chunks dropped); whether it was cancelled.
/// The status is committed first: a chunk being written sees it at its end and rolls back.
pub async fn cancel(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<bool, sqlx::Error> {
    let cancelled = sqlx::query(
        "UPDATE contact_imports
            SET status = 'cancelled', finished_at = now(), holder = NULL, locked_until = NULL
          WHERE tenant_id = $1 AND id = $2 AND status IN ('queued', 'running')",
    )
    .bind(tenant)
    .bind(id)
    .execute(pool)
    .await?;
    if cancelled.rows_affected() == 1 {
        delete_chunks(pool, tenant, id).await?;
    }
    Ok(cancelled.rows_affected() == 1)
}
