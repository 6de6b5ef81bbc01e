//! Handlers' transactions run again when PostgreSQL ends them over a conflict.

use std::future::Future;
use std::time::Duration;

use crate::error::{ApiError, ApiResult, is_conflict};

/// How many more times [`retry_conflicts`] runs a transaction PostgreSQL ended.
pub const CONFLICT_RETRIES: u32 = 2;

/// Runs `transaction` (all of one transaction, from `db::begin` to its commit, and nothing
/// outside the database) again when PostgreSQL ended it to break a deadlock or a
/// serialisation failure, at most [`CONFLICT_RETRIES`] more times, after a short random
/// pause. Locks taken in one order keep the deadlocks we know of from happening; this keeps
/// a client from getting a 503 for one we do not know of, since everything the attempt
/// wrote was rolled back.
pub async fn retry_conflicts<T, F>(mut transaction: impl FnMut() -> F) -> ApiResult<T>
where
    F: Future<Output = ApiResult<T>>,
{
    let mut retries = 0;
    loop {
        match transaction().await {
            Err(ApiError::Database(e)) if is_conflict(&e) && retries < CONFLICT_RETRIES => {
                retries += 1;
                metrics::counter!("db_transaction_retries_total").increment(1);
                tracing::warn!(error = %e, retry = retries, "transaction ended by a conflict; running it again");
                let pause = rand::random_range(5..50);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            other => return other,
        }
    }
}
