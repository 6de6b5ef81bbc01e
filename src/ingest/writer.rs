//! Group commit of event ingestion: concurrent requests share one transaction.
//!
//! A request hands its validated events to the [`Writer`] and waits for their outcomes. The
//! writer tasks of its [`GroupQueue`] take the requests waiting (as many as arrived while the
//! previous write ran, up to `ingest_max_group` events), record them together, and answer
//! every request. When every contact is known and no event has an idempotency key, that is one
//! statement with no transaction around it ([`ingest::ingest_known`]); otherwise one
//! transaction through [`ingest::ingest`]. Each event is durable before its 202, but a burst of
//! requests costs one commit instead of five round trips and one commit each. At low load a
//! group is one request: nothing waits for company.
//!
//! A group that fails before its commit (a statement error in one tenant's part) is retried
//! request by request, so one request's failure is never another's. A failed commit is not
//! retried: whether it happened is unknown, and events without an idempotency key would be
//! recorded twice.

use std::collections::BTreeMap;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::domain::{TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::group_commit::GroupQueue;
use crate::ingest::{self, Item, Outcome};

/// One request's events and where to send their outcomes.
struct Submission {
    tenant: TenantContext,
    items: Vec<Item>,
    reply: oneshot::Sender<StoreResult<Vec<Outcome>>>,
}

/// The group-commit queue of event ingestion in one process (see `crate::group_commit`).
pub struct Writer {
    queue: GroupQueue<Submission>,
}

impl Writer {
    /// `writers` transactions may be open at once, each with up to `max_group` events (a
    /// request is never split).
    pub fn new(pool: PgPool, writers: usize, max_group: usize, stop: CancellationToken) -> Writer {
        Writer {
            queue: GroupQueue::new(
                "ingest_group_requests",
                writers,
                max_group,
                |job: &Submission| job.items.len(),
                stop,
                move |group| write_group(pool.clone(), group),
            ),
        }
    }

    /// Records a tenant's events, committed (with other requests' events) before it returns.
    /// Outcomes are in input order.
    pub async fn ingest(
        &self,
        tenant: TenantContext,
        items: Vec<Item>,
    ) -> StoreResult<Vec<Outcome>> {
        let (reply, outcome) = oneshot::channel();
        let job = Submission {
            tenant,
            items,
            reply,
        };
        if self.queue.submit(job).await.is_err() {
            return Err(StoreError::Unavailable(
                "event ingestion is shutting down".into(),
            ));
        }
        outcome.await.map_err(|_| {
            StoreError::Unavailable("the event writer stopped before answering; retry".to_owned())
        })?
    }
}

/// Writes a group, in one statement when its contacts are all known, else in one
/// transaction (else request by request), and answers each request.
async fn write_group(pool: PgPool, group: Vec<Submission>) {
    let pool = &pool;
    match write_known(pool, &group).await {
        Ok(Some(outcomes)) => return answer(group, outcomes),
        Ok(None) => {}
        // The statement failed as a whole: nothing was written.
        Err(sqlx::Error::Database(e)) => {
            tracing::warn!(error = %e, "the one-statement path failed; writing in a transaction");
        }
        // The connection failed mid-way: whether the statement ran is unknown.
        Err(e) => return fail(group, &crate::error::error_chain(&e)),
    }
    if group.len() == 1 {
        return write_each(pool, group).await;
    }
    match write_together(pool, &group).await {
        Ok(Some(outcomes)) => answer(group, outcomes),
        Ok(None) => write_each(pool, group).await,
        Err(e) => fail(group, &e),
    }
}

/// Answers each request with its outcomes.
fn answer(group: Vec<Submission>, outcomes: Vec<Vec<Outcome>>) {
    for (job, outcome) in group.into_iter().zip(outcomes) {
        let _ = job.reply.send(Ok(outcome));
    }
}

/// Answers each request with a write that may or may not have happened (the connection
/// failed mid-way): a 503 to retry, as for any lost connection; events that carry an
/// `idempotency_key` are recorded once however often they are retried.
fn fail(group: Vec<Submission>, reason: &str) {
    tracing::warn!(
        reason,
        requests = group.len(),
        "writing a group of events failed"
    );
    for job in group {
        let _ = job.reply.send(Err(StoreError::Unavailable(
            "the events could not be written; retry the request (with an idempotency_key on \
             each event, a retry records it once)"
                .to_owned(),
        )));
    }
}

/// Writes and answers each request in a transaction of its own.
async fn write_each(pool: &PgPool, group: Vec<Submission>) {
    for job in group {
        let result = write_alone(pool, &job.tenant, &job.items).await;
        let _ = job.reply.send(result);
    }
}

/// The group through [`ingest::ingest_known`]: outcomes per request, or None when it needs
/// the full path.
async fn write_known(
    pool: &PgPool,
    group: &[Submission],
) -> Result<Option<Vec<Vec<Outcome>>>, sqlx::Error> {
    let items: Vec<(TenantId, &Item)> = group
        .iter()
        .flat_map(|job| job.items.iter().map(|item| (job.tenant.id, item)))
        .collect();
    let mut conn = pool.acquire().await?;
    let Some(outcomes) = ingest::ingest_known(&mut conn, &items).await? else {
        return Ok(None);
    };
    let mut outcomes = outcomes.into_iter();
    Ok(Some(
        group
            .iter()
            .map(|job| outcomes.by_ref().take(job.items.len()).collect())
            .collect(),
    ))
}

/// One request's events in a transaction of their own.
async fn write_alone(
    pool: &PgPool,
    tenant: &TenantContext,
    items: &[Item],
) -> StoreResult<Vec<Outcome>> {
    let mut tx = crate::db::begin(pool).await?;
    let refs: Vec<&Item> = items.iter().collect();
    let outcomes = ingest::ingest(&mut tx, tenant, &refs).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Every request's events in one transaction, tenant by tenant in id order (so concurrent
/// groups take their locks in one order). Outcomes per request, in group order; None when the
/// group failed before its commit and must be written request by request; an error when the
/// commit itself failed.
async fn write_together(
    pool: &PgPool,
    group: &[Submission],
) -> Result<Option<Vec<Vec<Outcome>>>, String> {
    let mut by_tenant: BTreeMap<uuid::Uuid, Vec<usize>> = BTreeMap::new();
    for (i, job) in group.iter().enumerate() {
        by_tenant.entry(job.tenant.id.0).or_default().push(i);
    }
    let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); group.len()];
    let mut tx = match crate::db::begin(pool).await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot begin a group of events");
            return Ok(None);
        }
    };
    for jobs in by_tenant.values() {
        let items: Vec<&Item> = jobs.iter().flat_map(|&i| &group[i].items).collect();
        let tenant = &group[jobs[0]].tenant;
        let mut recorded = match ingest::ingest(&mut tx, tenant, &items).await {
            Ok(o) => o.into_iter(),
            Err(e) => {
                tracing::debug!(error = %e, "a group of events failed; writing its requests one by one");
                return Ok(None);
            }
        };
        for &i in jobs {
            outcomes[i] = recorded.by_ref().take(group[i].items.len()).collect();
        }
    }
    match tx.commit().await {
        Ok(()) => Ok(Some(outcomes)),
        Err(e) => Err(crate::error::error_chain(&e)),
    }
}
