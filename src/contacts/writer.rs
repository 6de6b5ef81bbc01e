//! Group commit of single contact upserts (`PUT /v1/contacts/{external_id}`): concurrent
//! requests share one transaction and one [`store::upsert_many`] per tenant, as events do
//! (`crate::group_commit`). A group that fails as a whole (a lost connection, a deadlock) is
//! written again request by request, so one request's failure is never another's.

use std::collections::BTreeMap;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::model::ContactChanges;
use super::store::{self, BatchItem, ItemOutcome, Upserted};
use crate::domain::TenantContext;
use crate::error::{StoreError, StoreResult};
use crate::group_commit::GroupQueue;

/// Most requests one transaction takes.
const MAX_GROUP: usize = 500;

struct Job {
    tenant: TenantContext,
    external_id: String,
    changes: ContactChanges,
    reply: oneshot::Sender<StoreResult<Upserted>>,
}

/// The group-commit queue of contact upserts in one process.
pub struct Writer {
    queue: GroupQueue<Job>,
}

impl Writer {
    pub fn new(pool: PgPool, writers: usize, stop: CancellationToken) -> Writer {
        Writer {
            queue: GroupQueue::new(
                "contact_group_requests",
                writers,
                MAX_GROUP,
                |_: &Job| 1,
                stop,
                move |group| write_group(pool.clone(), group),
            ),
        }
    }

    /// Creates or updates the contact, committed (with other requests' contacts) before it
    /// returns.
    pub async fn upsert(
        &self,
        tenant: TenantContext,
        external_id: String,
        changes: ContactChanges,
    ) -> StoreResult<Upserted> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            tenant,
            external_id,
            changes,
            reply,
        };
        if self.queue.submit(job).await.is_err() {
            return Err(StoreError::Unavailable(
                "the service is shutting down".into(),
            ));
        }
        answer.await.map_err(|_| {
            StoreError::Unavailable("the contact writer stopped before answering; retry".into())
        })?
    }
}

/// Why a group was not written together.
enum Failure {
    /// Nothing was committed: each request can be written alone.
    BeforeCommit(StoreError),
    /// The commit failed: whether it happened is unknown.
    Commit(StoreError),
}

/// Writes a group: per tenant (in id order, so concurrent groups lock in one order), one
/// `upsert_many` in one transaction; request by request when that fails before its commit.
async fn write_group(pool: PgPool, group: Vec<Job>) {
    if group.len() > 1 {
        match write_together(&pool, &group).await {
            Ok(answers) => {
                for (job, answer) in group.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
                return;
            }
            Err(Failure::BeforeCommit(e)) => {
                tracing::debug!(error = %e, "a group of contact upserts failed; writing them one by one");
            }
            Err(Failure::Commit(e)) => {
                tracing::warn!(error = %e, requests = group.len(), "committing a group of contact upserts failed");
                for job in group {
                    let _ = job.reply.send(Err(StoreError::Unavailable(
                        "the contact could not be written; retry the request".into(),
                    )));
                }
                return;
            }
        }
    }
    for job in group {
        let result = write_alone(&pool, &job).await;
        let _ = job.reply.send(result);
    }
}

async fn write_alone(pool: &PgPool, job: &Job) -> StoreResult<Upserted> {
    let mut tx = crate::db::begin(pool).await?;
    let upserted = store::upsert(&mut tx, &job.tenant, &job.external_id, &job.changes, "").await?;
    tx.commit().await?;
    Ok(upserted)
}

/// Every request's contact in one transaction; answers in group order. A rejected item (an
/// invalid phone, an unknown agent) is that request's answer, not the group's failure.
async fn write_together(
    pool: &PgPool,
    group: &[Job],
) -> Result<Vec<StoreResult<Upserted>>, Failure> {
    let mut by_tenant: BTreeMap<uuid::Uuid, Vec<usize>> = BTreeMap::new();
    for (i, job) in group.iter().enumerate() {
        by_tenant.entry(job.tenant.id.0).or_default().push(i);
    }
    let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; group.len()];
    let mut contacts = std::collections::HashMap::new();
    let before = |e: sqlx::Error| Failure::BeforeCommit(e.into());
    let mut tx = crate::db::begin(pool).await.map_err(before)?;
    for jobs in by_tenant.values() {
        let tenant = &group[jobs[0]].tenant;
        let items: Vec<BatchItem<'_>> = jobs
            .iter()
            .map(|&i| BatchItem {
                external_id: &group[i].external_id,
                field_prefix: String::new(),
                changes: &group[i].changes,
            })
            .collect();
        let written =
            store::upsert_many(&mut tx, tenant, &items, "upsert", store::WriteMode::Upsert)
                .await
                .map_err(Failure::BeforeCommit)?;
        let ids: Vec<uuid::Uuid> = written.iter().filter_map(ItemOutcome::id).collect();
        for c in store::get_many(&mut tx, tenant.id, &ids)
            .await
            .map_err(Failure::BeforeCommit)?
        {
            contacts.insert(c.id, c);
        }
        for (&i, outcome) in jobs.iter().zip(written) {
            outcomes[i] = Some(outcome);
        }
    }
    tx.commit().await.map_err(|e| Failure::Commit(e.into()))?;
    Ok(outcomes
        .into_iter()
        .map(|o| {
            let outcome = o.ok_or_else(|| {
                StoreError::Internal(anyhow::anyhow!("an upsert without outcome"))
            })?;
            Upserted::from_outcome(outcome, |id| contacts.get(&id).cloned())
        })
        .collect())
}
