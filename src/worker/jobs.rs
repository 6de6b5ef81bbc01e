//! Runs the `jobs` table: the registry of job kinds, and the loop that claims due jobs, runs
//! each with its kind's implementation and records the outcome. Woken by the NOTIFY that
//! queuing a job sends at commit, and polling once a second besides.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::domain::TenantId;
use crate::jobs::store::{self, ClaimedJob};
use crate::jobs::{BackgroundJob, JobError};

/// How many jobs one round claims.
const BATCH: i64 = 20;
/// How often the table is looked at when no NOTIFY comes.
const POLL: Duration = Duration::from_secs(1);

type Runner = for<'a> fn(&'a AppState, TenantId, Value) -> BoxFuture<'a, Result<(), JobError>>;

/// Which implementation runs each job kind.
#[derive(Clone, Default)]
pub struct JobRegistry {
    runners: HashMap<&'static str, Runner>,
}

impl JobRegistry {
    /// The registry of every job kind Rapport queues.
    pub fn standard() -> JobRegistry {
        JobRegistry::default().register::<crate::telephony::insight::InsightCard>()
    }

    /// Adds a kind.
    pub fn register<J: BackgroundJob>(mut self) -> JobRegistry {
        self.runners.insert(J::KIND, run_as::<J>);
        self
    }

    async fn run(&self, state: &AppState, job: &ClaimedJob) -> Result<(), JobError> {
        match self.runners.get(job.kind.as_str()) {
            Some(runner) => runner(state, job.tenant_id, job.payload.clone()).await,
            None => Err(JobError::Fail(format!("unknown job kind `{}`", job.kind))),
        }
    }
}

fn run_as<J: BackgroundJob>(
    state: &AppState,
    tenant: TenantId,
    payload: Value,
) -> BoxFuture<'_, Result<(), JobError>> {
    Box::pin(async move {
        let job: J = serde_json::from_value(payload)
            .map_err(|e| JobError::Fail(format!("invalid {} payload: {e}", J::KIND)))?;
        job.run(state, tenant).await
    })
}

/// Runs the due jobs once; the number run.
pub async fn run_due(state: &AppState, registry: &JobRegistry) -> Result<usize, sqlx::Error> {
    let jobs = store::claim(&state.pool, BATCH).await?;
    for job in &jobs {
        let outcome = registry.run(state, job).await;
        if let Err(JobError::Retry(e) | JobError::Fail(e)) = &outcome {
            tracing::warn!(job = %job.id, kind = %job.kind, error = %e, "job did not succeed");
        }
        store::record_outcome(&state.pool, job, outcome).await?;
    }
    Ok(jobs.len())
}

/// Runs jobs until `shutdown`: at once when one is queued, else every second.
pub async fn run(state: AppState, wake: super::Wake, shutdown: CancellationToken) {
    let registry = JobRegistry::standard();
    super::repeat("jobs", shutdown, POLL, wake, || async {
        run_due(&state, &registry).await.map(|n| n > 0)
    })
    .await;
}
