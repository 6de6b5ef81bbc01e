//! The second half of an import: a worker task writes the stored chunks, in order.
//!
//! A worker holds an import with a lease (`holder`, `locked_until`), renewed by every chunk's
//! transaction, which also writes the chunk's contacts (`store::upsert_many`), adds to the
//! import's counters and first errors, and deletes the chunk: all of it or none, so a worker
//! that dies mid-chunk leaves the chunk for the next holder and no row is written twice. After
//! [`SLICE`] chunks the import goes back in the queue behind the others, so one tenant's
//! million rows do not hold up another's hundred. A dry run writes each chunk in a savepoint
//! it rolls back: the counts are exact, nothing stays (rows of one external id in two chunks
//! are each counted against the contacts as stored).

use serde_json::{Value, json};
use sqlx::{Acquire, PgPool};
use uuid::Uuid;

use super::store::{self as imports, Claimed, Tally};
use super::{Column, ImportFormat, MAX_ERRORS, PARTS, csv_row, ndjson_row};
use crate::AppState;
use crate::contacts::model::ContactChanges;
use crate::contacts::store::{self, BatchItem, ItemOutcome};
use crate::domain::{TenantContext, TenantId};
use crate::error::StoreError;
use crate::validate::{self, FieldError};

/// How long a worker holds an import without renewing it.
const LEASE_SECS: f64 = 60.0;
/// Chunks an import gets in one turn.
pub const SLICE: usize = 50;
/// Failed attempts at one chunk (the database away, a lock timeout) before the import fails.
const MAX_FAILURES: i32 = 5;

/// Takes the import whose turn it is and writes up to [`SLICE`] of its chunks; whether there
/// was one.
pub async fn round(state: &AppState, holder: Uuid) -> Result<bool, StoreError> {
    let swept = imports::sweep_abandoned(&state.pool).await?;
    if swept > 0 {
        tracing::warn!(
            uploads = swept,
            "deleted uploads whose process died before the file was in"
        );
    }
    let Some(import) = imports::claim(&state.pool, holder, LEASE_SECS, None).await? else {
        return Ok(false);
    };
    if let Err(e) = slice(&state.pool, &import, holder, SLICE, &|_| {}).await {
        record_failure(&state.pool, &import, holder, &e).await?;
    }
    Ok(true)
}

/// Writes one import to its end in this process (`rapport import contacts`), calling
/// `progress` with the rows of each chunk written; false when a worker holds it (it is being
/// written there). A chunk that fails is left to the workers' retries, and the error returned.
pub async fn run_import(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    holder: Uuid,
    progress: impl Fn(u64) + Send + Sync,
) -> Result<bool, StoreError> {
    let Some(import) = imports::claim(pool, holder, LEASE_SECS, Some((tenant, id))).await? else {
        return Ok(false);
    };
    if let Err(e) = slice(pool, &import, holder, usize::MAX, &progress).await {
        record_failure(pool, &import, holder, &e).await?;
        return Err(e);
    }
    Ok(true)
}

/// A chunk that could not be written: tried again after a backoff by whichever worker claims
/// it; failed at the [`MAX_FAILURES`]th failure in a row.
async fn record_failure(
    pool: &PgPool,
    import: &Claimed,
    holder: Uuid,
    e: &StoreError,
) -> Result<(), sqlx::Error> {
    let message = crate::error::error_chain(e);
    tracing::warn!(import = %import.id, tenant = %import.tenant_id, error = %message, "an import chunk failed");
    let message = format!("writing a chunk failed: {message}");
    imports::record_failure(pool, import, holder, &message, MAX_FAILURES).await?;
    Ok(())
}

/// Writes up to `chunks` chunks of `import` (its parts at once, each on its own connection),
/// then gives the turn away; completes it when no chunk is left.
async fn slice(
    pool: &PgPool,
    import: &Claimed,
    holder: Uuid,
    chunks: usize,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), StoreError> {
    let tenant = {
        let mut conn = pool.acquire().await?;
        crate::tenants::store::context(&mut conn, import.tenant_id)
            .await?
            .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("the tenant is gone")))?
    };
    let (format, mode) = (import.format, import.mode);
    let columns = match (&import.columns, format) {
        (Some(Value::Array(cols)), ImportFormat::Csv) => cols
            .iter()
            .map(|c| match c {
                Value::String(s) => Column::parse(s).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("stored columns: {e}"))?,
        (_, ImportFormat::Csv) => {
            return Err(StoreError::Internal(anyhow::anyhow!(
                "a CSV import without columns"
            )));
        }
        (_, ImportFormat::Ndjson) => Vec::new(),
    };
    let source = format!(
        "import:{}",
        import
            .filename
            .clone()
            .unwrap_or_else(|| import.id.to_string())
    );
    let job = Job {
        import,
        tenant: &tenant,
        format,
        mode,
        columns: &columns,
        source: &source,
        holder,
    };
    let per_part = chunks.div_ceil(PARTS).max(1);
    let lanes = (0..PARTS).map(|part| {
        let job = &job;
        async move {
            for _ in 0..per_part {
                match job.chunk(pool, part as i16).await? {
                    Step::Applied(rows) => progress(rows),
                    other => return Ok::<Step, StoreError>(other),
                }
            }
            Ok(Step::Applied(0))
        }
    });
    let ends = futures::future::join_all(lanes).await;
    let mut finished = true;
    for end in ends {
        match end? {
            Step::Lost => return Ok(()),
            Step::Applied(_) => finished = false,
            Step::Finished => {}
        }
    }
    // A part can look empty while a chunk is left: its first chunk was locked by a worker
    // that died holding it, and `SELECT .. ORDER BY seq LIMIT 1 FOR UPDATE` returns no row
    // when the row it waited for is gone by then. Not completed then: back in the queue,
    // where the next round takes it up again (as after any turn).
    if !(finished && imports::complete(pool, import, holder).await?) {
        imports::release(pool, import, holder).await?;
    }
    Ok(())
}

enum Step {
    /// A chunk of this many rows.
    Applied(u64),
    /// No chunk left in the part.
    Finished,
    /// Another worker took the import over (this one stalled past its lease).
    Lost,
}

struct Job<'a> {
    import: &'a Claimed,
    tenant: &'a TenantContext,
    format: ImportFormat,
    mode: super::ImportMode,
    columns: &'a [Option<Column>],
    source: &'a str,
    holder: Uuid,
}

impl Tally {
    fn fail(&mut self, line: i64, errors: Vec<FieldError>, room: usize) {
        self.failed += 1;
        for e in errors {
            if self.errors.len() < room {
                self.errors
                    .push(json!({"line": line, "field": e.field, "message": e.message}));
            }
        }
    }
}

impl Job<'_> {
    /// Writes the part's next chunk in one transaction with its counters and its deletion.
    /// The chunk's row lock keeps a second holder (after a steal) off it until this one
    /// commits or rolls back; the counters' update, last, commits only under the lease.
    async fn chunk(&self, pool: &PgPool, part: i16) -> Result<Step, StoreError> {
        let mut tx = crate::db::begin(pool).await?;
        let Some((seq, lines, body)) = imports::next_chunk(&mut tx, self.import, part).await?
        else {
            return Ok(Step::Finished);
        };
        let Some(listed) = imports::errors_listed(&mut tx, self.import, self.holder).await? else {
            return Ok(Step::Lost);
        };
        let room = MAX_ERRORS.saturating_sub(usize::try_from(listed).unwrap_or(0));
        let mut tally = Tally::default();
        let rows = self.rows(&lines, &body)?;
        let mut valid: Vec<(i64, String, ContactChanges)> = Vec::with_capacity(rows.len());
        for (line, row) in rows {
            let checked = row.and_then(|(external_id, input)| {
                let external_id = validate::text(&external_id, 255)
                    .map_err(|m| vec![FieldError::new("external_id", m)])?;
                let mut changes = input.into_changes("", &self.tenant.default_country)?;
                changes.consent_source = Some(self.source.to_owned());
                Ok((external_id, changes))
            });
            match checked {
                Ok((external_id, changes)) => valid.push((line, external_id, changes)),
                Err(errors) => tally.fail(line, errors, room),
            }
        }
        let items: Vec<BatchItem<'_>> = valid
            .iter()
            .map(|(_, external_id, changes)| BatchItem {
                external_id,
                field_prefix: String::new(),
                changes,
            })
            .collect();
        let mode = self.mode.write_mode();
        let outcomes = if self.import.dry_run {
            let mut trial = tx.begin().await?;
            let outcomes =
                store::upsert_many(&mut trial, self.tenant, &items, "import", mode).await?;
            trial.rollback().await?;
            outcomes
        } else {
            store::upsert_many(&mut tx, self.tenant, &items, "import", mode).await?
        };
        for ((line, _, _), outcome) in valid.iter().zip(outcomes) {
            match outcome {
                ItemOutcome::Created(_) => tally.created += 1,
                ItemOutcome::Updated(_) => tally.updated += 1,
                ItemOutcome::Unchanged(_) => tally.unchanged += 1,
                ItemOutcome::Skipped(_) => tally.skipped += 1,
                ItemOutcome::Rejected(errors) => tally.fail(*line, errors, room),
            }
        }
        tally.rows = lines.len() as i64;
        let counted = imports::count_chunk(
            &mut tx,
            self.import,
            self.holder,
            part,
            seq,
            tally,
            MAX_ERRORS,
            LEASE_SECS,
        )
        .await?;
        if !counted {
            // Cancelled, or taken over: nothing of this chunk stays.
            tx.rollback().await?;
            return Ok(Step::Lost);
        }
        tx.commit().await?;
        metrics::counter!("contact_import_rows_applied_total").increment(lines.len() as u64);
        Ok(Step::Applied(lines.len() as u64))
    }

    /// The chunk's rows with their lines: each an upsert or its errors.
    #[allow(clippy::type_complexity)]
    fn rows(
        &self,
        lines: &[i64],
        body: &[u8],
    ) -> Result<
        Vec<(
            i64,
            Result<(String, crate::contacts::model::ContactInput), Vec<FieldError>>,
        )>,
        StoreError,
    > {
        let rows: Vec<_> = match self.format {
            ImportFormat::Csv => {
                let delimiter = self
                    .import
                    .delimiter
                    .as_deref()
                    .and_then(|d| d.bytes().next())
                    .unwrap_or(b',');
                let mut reader = csv::ReaderBuilder::new()
                    .delimiter(delimiter)
                    .has_headers(false)
                    .flexible(true)
                    .from_reader(body);
                let mut out = Vec::with_capacity(lines.len());
                let mut record = csv::StringRecord::new();
                for line in lines {
                    let read = reader
                        .read_record(&mut record)
                        .map_err(|e| anyhow::anyhow!("a stored chunk: {e}"))?;
                    if !read {
                        break;
                    }
                    out.push((*line, csv_row(self.columns, &record)));
                }
                out
            }
            ImportFormat::Ndjson => lines
                .iter()
                .copied()
                .zip(body.split(|b| *b == b'\n'))
                .map(|(line, text)| (line, ndjson_row(text)))
                .collect(),
        };
        if rows.len() != lines.len() {
            return Err(StoreError::Internal(anyhow::anyhow!(
                "a stored chunk holds {} rows for {} lines",
                rows.len(),
                lines.len()
            )));
        }
        Ok(rows)
    }
}
