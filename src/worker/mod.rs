//! The background worker: a set of jobs run until shutdown.
//!
//! Each job is a loop in a [`JoinSet`]; on shutdown every loop finishes its current round and
//! returns. Jobs coordinate through the database only, so any number of worker processes can
//! run against one database.

pub mod dispatch;
pub mod jobs;
pub mod wake;

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use wake::{Wake, Wakeups};

/// How often expired idempotency keys are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// How often open tickets are checked against their SLA.
const SLA_EVERY: Duration = Duration::from_secs(30);

/// Runs every job until `shutdown` is cancelled.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    let wakeups = Wakeups::start(
        state.listen_pool.clone(),
        &[
            crate::messages::store::NOTIFY_CHANNEL,
            crate::jobs::store::NOTIFY_CHANNEL,
            crate::contacts::import::NOTIFY_CHANNEL,
            crate::broadcasts::NOTIFY_CHANNEL,
            crate::events::inbox::NOTIFY_CHANNEL,
        ],
        shutdown.clone(),
    );
    tasks.spawn(dispatch::run(
        state.clone(),
        wakeups.subscribe(crate::messages::store::NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    tasks.spawn(jobs::run(
        state.clone(),
        wakeups.subscribe(crate::jobs::store::NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    tasks.spawn(run_campaigns(
        state.clone(),
        wakeups.subscribe(crate::events::inbox::NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    tasks.spawn(crate::inbound::imap::run(state.clone(), shutdown.clone()));
    tasks.spawn(run_imports(
        state.clone(),
        wakeups.subscribe(crate::contacts::import::NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    tasks.spawn(run_broadcasts(
        state.clone(),
        wakeups.subscribe(crate::broadcasts::NOTIFY_CHANNEL),
        shutdown.clone(),
    ));
    let s = state.clone();
    tasks.spawn(repeat(
        "idempotency purge",
        shutdown.clone(),
        PURGE_EVERY,
        Wake::never(),
        move || {
            let s = s.clone();
            async move {
                let n = purge_once(&s).await?;
                if n > 0 {
                    tracing::info!(deleted = n, "purged expired idempotency keys");
                }
                Ok::<_, sqlx::Error>(false)
            }
        },
    ));
    let s = state.clone();
    let every = Duration::from_secs((state.config.outbox_lease_secs / 4).max(1));
    tasks.spawn(repeat(
        "lease sweep",
        shutdown.clone(),
        every,
        Wake::never(),
        move || {
            let s = s.clone();
            async move {
                let n = crate::messages::store::sweep_expired_leases(&s.pool).await?;
                if n > 0 {
                    metrics::counter!("outbox_leases_expired_total").increment(n);
                    tracing::warn!(
                        messages = n,
                        "re-queued messages whose worker stopped mid-send"
                    );
                }
                Ok::<_, sqlx::Error>(false)
            }
        },
    ));
    let s = state.clone();
    tasks.spawn(repeat(
        "SLA watch",
        shutdown.clone(),
        SLA_EVERY,
        Wake::never(),
        move || {
            let s = s.clone();
            async move {
                let n = crate::support::store::check_sla(&s.pool).await?;
                if n > 0 {
                    tracing::info!(breaches = n, "SLA breaches recorded");
                }
                Ok::<_, sqlx::Error>(false)
            }
        },
    ));
    tracing::info!(tasks = tasks.len(), "worker started");
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a worker task ended abnormally");
        }
    }
    tracing::info!("worker stopped");
}

/// The shape of every periodic task: run a round; run the next one at once while a round says
/// there is more to do; else wait `every`, a NOTIFY on `wake` or `shutdown`, whichever first.
/// A failed round is logged and counts as idle. Returns when `shutdown` is cancelled, after the
/// round in progress.
pub async fn repeat<F, Fut, E>(
    name: &'static str,
    shutdown: CancellationToken,
    every: Duration,
    mut wake: Wake,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: std::error::Error,
{
    loop {
        let busy = match round().await {
            Ok(busy) => busy,
            Err(e) => {
                tracing::warn!(task = name, error = %crate::error::error_chain(&e), "worker round failed");
                false
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if busy {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
            () = wake.notified() => {}
        }
    }
}

/// How often the contact imports' queue is looked at when no NOTIFY comes.
const IMPORTS_POLL: Duration = Duration::from_secs(2);

/// Writes contact imports (`contacts::import::apply`) until `shutdown`: at once when one is
/// queued, else every two seconds.
async fn run_imports(state: AppState, wake: Wake, shutdown: CancellationToken) {
    use crate::contacts::import::apply;
    let holder = uuid::Uuid::now_v7();
    repeat("contact imports", shutdown, IMPORTS_POLL, wake, || {
        apply::round(&state, holder)
    })
    .await;
}

/// How often broadcasts are looked at when no NOTIFY comes (a scheduled one's time).
const BROADCASTS_POLL: Duration = Duration::from_secs(1);

/// Walks due broadcasts (`broadcasts::round`) until `shutdown`: at once when one is scheduled
/// or resumed, else every second.
async fn run_broadcasts(state: AppState, wake: Wake, shutdown: CancellationToken) {
    let holder = uuid::Uuid::now_v7();
    repeat("broadcasts", shutdown, BROADCASTS_POLL, wake, || {
        crate::broadcasts::round(&state, holder)
    })
    .await;
}

/// How often the engine looks for new events while warm: for [`WARM_FOR`] after it last had
/// work, a ring of the inbox bell or a NOTIFY.
const CAMPAIGN_POLL: Duration = Duration::from_millis(25);
/// How long the engine stays warm. A ring comes before its transaction commits
/// (`events::inbox`): this covers the commit, and the next events of a burst.
const WARM_FOR: Duration = Duration::from_secs(2);
/// How often schedules (birthdays) are looked at.
const SCHEDULE_EVERY: Duration = Duration::from_secs(30);

/// Runs the campaign engine until `shutdown`: rounds back to back while there is work; then,
/// warm, a round every [`CAMPAIGN_POLL`]; then, cold, a wait for this process's inbox bell, a
/// NOTIFY on `wake` (events an API process wrote), the next journey's time, the next look at
/// the schedules or `campaign_poll_interval_ms`, whichever comes first. An idle worker used to
/// poll every 25 ms for good: 80 queries a second against an idle database.
pub async fn run_campaigns(state: AppState, mut wake: Wake, shutdown: CancellationToken) {
    let mut bell = crate::events::inbox::subscribe();
    let idle_poll = Duration::from_millis(state.config.campaign_poll_interval_ms.max(1));
    let mut last_schedule: Option<tokio::time::Instant> = None;
    let mut warm_until = tokio::time::Instant::now() + WARM_FOR;
    loop {
        let schedules = last_schedule.is_none_or(|t| t.elapsed() >= SCHEDULE_EVERY);
        if schedules {
            last_schedule = Some(tokio::time::Instant::now());
        }
        let (round, failed) = match crate::campaigns::engine::round(&state, schedules).await {
            Ok(round) => (round, false),
            Err(e) => {
                tracing::warn!(task = "campaigns", error = %crate::error::error_chain(&e), "worker round failed");
                (crate::campaigns::engine::Round::default(), true)
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        let now = tokio::time::Instant::now();
        if !round.is_idle() {
            warm_until = now + WARM_FOR;
            continue;
        }
        let warm = now < warm_until;
        let mut wait = if warm { CAMPAIGN_POLL } else { idle_poll };
        // After a failed round (the database away, say) the poll interval, and one warning.
        if !warm && !failed {
            match crate::campaigns::engine::next_wake(&state).await {
                Ok(Some(at)) => {
                    let until = (at - state.clock.now()).to_std().unwrap_or_default();
                    wait = wait.min(until.max(CAMPAIGN_POLL));
                }
                Ok(None) => {}
                // The poll interval then: the next round finds what is due.
                Err(e) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), "cannot read when the next journey is due")
                }
            }
        }
        if let Some(t) = last_schedule {
            wait = wait.min((t + SCHEDULE_EVERY).saturating_duration_since(now));
        }
        if warm {
            // Warm: the poll's pace, whatever rings meanwhile. A round at each ring would take
            // one group commit's events at a time under load (measured: the lag of a steady
            // 7,500 events/s grew from 0.3-0.6 s to 1-2.6 s), where a round after the poll's
            // pause takes a batch; rings only keep the engine warm.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let rang = bell.has_changed().unwrap_or(false);
            bell.mark_unchanged();
            if wake.take() || rang {
                warm_until = tokio::time::Instant::now() + WARM_FOR;
            }
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            _ = bell.changed() => warm_until = tokio::time::Instant::now() + WARM_FOR,
            () = wake.notified() => warm_until = tokio::time::Instant::now() + WARM_FOR,
        }
    }
}

/// Runs the campaign engine and the dispatcher until neither has anything left to do (tests
/// and the benchmark drive the worker this way instead of sleeping).
pub async fn drain(state: &AppState) -> anyhow::Result<usize> {
    let mut total = 0;
    let holder = uuid::Uuid::now_v7();
    loop {
        let mut walked = 0;
        while crate::broadcasts::round(state, holder).await? {
            walked += 1;
        }
        let round = crate::campaigns::engine::round(state, true).await?;
        let sent = dispatch::drain(state).await?;
        let done = walked + round.events + round.contacts + round.scheduled + sent;
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
