//! Background jobs that are not messages (today: the Aircall insight card push). A job is a
//! type implementing [`BackgroundJob`]: its payload is the serialised value, its kind a
//! constant. Rows are claimed with a lease like the outbox, retried with backoff and failed
//! with the reason after the last attempt; a job is unique per kind and dedupe key, so a
//! redelivered webhook does not repeat it. The worker runs them (`worker::jobs`, which holds
//! the registry of kinds).

pub mod store;

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;

use crate::AppState;
use crate::domain::TenantId;

/// A kind of background job. The value is the job's payload.
pub trait BackgroundJob: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stored with each job; names the implementation that runs it. Never rename one that may
    /// still be queued.
    const KIND: &'static str;

    /// Does the work once; an `Err` is retried or failed as [`JobError`] says.
    fn run(
        self,
        state: &AppState,
        tenant: TenantId,
    ) -> impl Future<Output = Result<(), JobError>> + Send;
}

/// Why a job did not succeed.
#[derive(Debug, Clone)]
pub enum JobError {
    /// Worth another attempt later (the provider is down, the database was busy).
    Retry(String),
    /// Never going to work (bad payload, no configuration): failed at once with this reason.
    Fail(String),
}

/// Queues `job` in the caller's transaction unless one of its kind with `dedupe_key` exists;
/// whether it was queued. The workers are woken when the transaction commits.
pub async fn enqueue<J: BackgroundJob>(
    conn: &mut PgConnection,
    tenant: TenantId,
    dedupe_key: &str,
    job: &J,
) -> Result<bool, sqlx::Error> {
    let payload = serde_json::to_value(job)
        .map_err(|e| sqlx::Error::Encode(format!("job payload: {e}").into()))?;
    store::insert(conn, tenant, J::KIND, dedupe_key, &payload).await
}
