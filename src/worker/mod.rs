//! The background worker: a set of jobs run until shutdown.
//!
//! Each job is a loop in a [`JoinSet`]; on shutdown every loop finishes its current round and
//! returns. Jobs coordinate through the database only, so any number of worker processes can
//! run against one database.

pub mod dispatch;

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// How often expired idempotency keys are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Runs every job until `shutdown` is cancelled.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let mut jobs = JoinSet::new();
    jobs.spawn(purge_idempotency_keys(state.clone(), shutdown.clone()));
    jobs.spawn(dispatch::run(state.clone(), shutdown.clone()));
    jobs.spawn(sweep_leases(state.clone(), shutdown.clone()));
    jobs.spawn(watch_sla(state.clone(), shutdown.clone()));
    jobs.spawn(crate::jobs::run(state.clone(), shutdown.clone()));
    jobs.spawn(run_campaigns(state.clone(), shutdown.clone()));
    tracing::info!(jobs = jobs.len(), "worker started");
    while let Some(result) = jobs.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a worker job ended abnormally");
        }
    }
    tracing::info!("worker stopped");
}

/// Deletes stored `Idempotency-Key` responses past the retention.
async fn purge_idempotency_keys(state: AppState, shutdown: CancellationToken) {
    loop {
        match purge_once(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "purged expired idempotency keys"),
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot purge idempotency keys")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}

/// Re-queues messages whose worker died holding them, a few times per lease.
async fn sweep_leases(state: AppState, shutdown: CancellationToken) {
    let every = Duration::from_secs((state.config.outbox_lease_secs / 4).max(1));
    loop {
        match crate::messages::store::sweep_expired_leases(&state.pool).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("outbox_leases_expired_total").increment(n);
                tracing::warn!(
                    messages = n,
                    "re-queued messages whose worker stopped mid-send"
                );
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot sweep expired leases")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Stamps SLA breaches of open tickets, every 30 seconds.
async fn watch_sla(state: AppState, shutdown: CancellationToken) {
    loop {
        match crate::support::settings::check_sla(&state.pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(breaches = n, "SLA breaches recorded"),
            Err(e) => tracing::warn!(error = %crate::error::error_chain(&e), "cannot check SLAs"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// How often the engine looks for new events and due journeys when it has nothing to do.
const CAMPAIGN_POLL: Duration = Duration::from_millis(25);
/// How often schedules (birthdays) are looked at.
const SCHEDULE_EVERY: Duration = Duration::from_secs(30);

/// Runs the campaign engine: rounds back to back while there is work, a short poll otherwise.
async fn run_campaigns(state: AppState, shutdown: CancellationToken) {
    let mut last_schedule: Option<tokio::time::Instant> = None;
    loop {
        let schedules = last_schedule.is_none_or(|t| t.elapsed() >= SCHEDULE_EVERY);
        if schedules {
            last_schedule = Some(tokio::time::Instant::now());
        }
        let idle = match crate::campaigns::engine::round(&state, schedules).await {
            Ok(round) => round.is_idle(),
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "campaign round failed");
                true
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if idle {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(CAMPAIGN_POLL) => {}
            }
        }
    }
}

/// Runs the campaign engine and the dispatcher until neither has anything left to do (tests
/// and the benchmark drive the worker this way instead of sleeping).
pub async fn drain(state: &AppState) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let round = crate::campaigns::engine::round(state, true).await?;
        let sent = dispatch::drain(state).await?;
        let done = round.events + round.contacts + round.scheduled + sent;
        if done == 0 {
            return Ok(total);
        }
        total += done;
    }
}

/// One round of the idempotency-key purge; the number of keys deleted.
pub async fn purge_once(state: &AppState) -> Result<u64, sqlx::Error> {
    crate::http::idempotency::purge_expired(&state.pool, state.config.idempotency_retention_hours)
        .await
}
