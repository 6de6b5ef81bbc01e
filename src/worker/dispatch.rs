//! Dispatch: claim due messages with a lease, hand each to its provider, record the outcome.
//!
//! Workers wake on NOTIFY when a message is queued and poll as a fallback. A message whose
//! worker died mid-send is put back in the queue by the lease sweeper (`worker::sweep_leases`),
//! so nothing committed to the outbox is lost; the lease is fenced by the attempt number, so a
//! worker that lost its lease cannot overwrite the new holder's outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::wake::Wake;
use crate::AppState;
use crate::campaigns::store::journeys;
use crate::channels::store as channels;
use crate::channels::{Outbound, Provider, SendError};
use crate::domain::TenantId;
use crate::domain::backoff;
use crate::domain::{Channel, Purpose};
use crate::error::StoreError;
use crate::messages::store::{self, AttemptOutcome, Claimed, Deferred};
use crate::templates::model::Rendered;
use crate::templates::render::RenderError;
use crate::templates::sandbox::SandboxError;

/// Runs `outbox_dispatchers` dispatch loops until `shutdown`. While one loop records its
/// batch, the others are claiming and sending theirs (SKIP LOCKED keeps them apart), so the
/// provider and the database are both kept busy.
pub async fn run(state: AppState, wake: Wake, shutdown: CancellationToken) {
    let loops = (0..state.config.outbox_dispatchers.max(1))
        .map(|_| tokio::spawn(run_loop(state.clone(), wake.clone(), shutdown.clone())));
    futures::future::join_all(loops).await;
}

/// One dispatch loop: rounds back to back while messages are due, else a wait for NOTIFY or
/// the poll interval; a batch in flight is finished first on shutdown.
async fn run_loop(state: AppState, mut wake: Wake, shutdown: CancellationToken) {
    let poll = Duration::from_millis(state.config.outbox_poll_interval_ms);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // A paced channel with messages due but no room yet says when it has some.
        let mut wait = poll;
        match dispatch_round(&state).await {
            Ok((n, _)) if n > 0 => continue,
            Ok((_, Some(paced))) => wait = wait.min(paced),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "dispatch round failed")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One round: claims a batch and sends it; the number of messages handled.
pub async fn dispatch_once(state: &AppState) -> Result<usize, sqlx::Error> {
    Ok(dispatch_round(state).await?.0)
}

/// Claims what paced channels (`channels::store::Pacing`) may send now, each channel in one
/// transaction holding its pacing row, so that every worker process shares its rate; and
/// the soonest a paced channel with messages due has room again.
async fn claim_paced(
    state: &AppState,
    lease: Duration,
) -> Result<(Vec<Claimed>, Option<Duration>), sqlx::Error> {
    let mut claimed = Vec::new();
    let mut wait: Option<Duration> = None;
    for (tenant, channel) in channels::paced_with_due(&state.pool).await? {
        let mut tx = crate::db::begin(&state.pool).await?;
        let Some(pacing) = channels::lock_pacing(&mut tx, tenant, &channel).await? else {
            continue;
        };
        let (room, next) = pacing.grant(state.config.outbox_batch_size);
        if let Some(next) = next {
            wait = Some(wait.map_or(next, |w| w.min(next)));
        }
        if room > 0 {
            let got = store::claim_paced(&mut tx, tenant, &channel, room, lease).await?;
            channels::set_tat(&mut tx, tenant, &channel, pacing.after(got.len() as i64)).await?;
            claimed.extend(got);
        }
        tx.commit().await?;
    }
    Ok((claimed, wait))
}

/// [`dispatch_once`], with when a paced channel has room again if one is waiting.
async fn dispatch_round(state: &AppState) -> Result<(usize, Option<Duration>), sqlx::Error> {
    let config = &state.config;
    let lease = Duration::from_secs(config.outbox_lease_secs);
    let mut claimed = store::claim(&state.pool, config.outbox_batch_size, lease).await?;
    let (paced, wait) = claim_paced(state, lease).await?;
    claimed.extend(paced);
    let n = claimed.len();
    let claimed = render_claimed(state, claimed).await;
    // One settings lookup per tenant and channel a round, not one per message.
    let mut providers: HashMap<(TenantId, Channel), Result<Arc<dyn Provider>, SendError>> =
        HashMap::new();
    for m in &claimed {
        if let Some(channel) = Channel::parse(&m.channel)
            && !providers.contains_key(&(m.tenant_id, channel))
        {
            let provider = state
                .channels
                .provider(&state.pool, m.tenant_id, channel)
                .await;
            providers.insert((m.tenant_id, channel), provider);
        }
    }
    let providers = &providers;
    let concurrency = config.outbox_concurrency.max(1);
    // Outcomes are recorded as they come in, those ready together in one transaction, not
    // once for the whole batch: a worker killed mid-batch leaves only the sends of its last
    // moments unrecorded (to be resent after the lease, with the same idempotency key),
    // not every send of the batch.
    let mut finished = futures::stream::iter(claimed)
        .map(|m| async move {
            let provider =
                Channel::parse(&m.channel).and_then(|c| providers.get(&(m.tenant_id, c)).cloned());
            attempt(state, m, provider).await
        })
        .buffer_unordered(concurrency)
        .ready_chunks(concurrency);
    while let Some(attempted) = finished.next().await {
        record_all(state, attempted).await;
    }
    Ok((n, wait))
}

/// Renders the claimed messages that were queued with their template still to run (see
/// `messages::store::Deferred`), writes what they rendered to, and returns every message
/// ready to send. No database connection is held while a template runs. A template that
/// does not render fails its message (and ends the journey that sent it); a renderer that is
/// out of reach is retried like a provider that is.
async fn render_claimed(state: &AppState, claimed: Vec<Claimed>) -> Vec<Claimed> {
    let (deferred, mut ready): (Vec<Claimed>, Vec<Claimed>) =
        claimed.into_iter().partition(|m| m.compose.is_some());
    if deferred.is_empty() {
        return ready;
    }
    let started_at = Utc::now();
    let opts = match state.send_options().await {
        Ok(opts) => opts,
        Err(e) => {
            let reason = format!("the link-signing key cannot be read: {e}");
            for m in deferred {
                let outcome = retry_or_fail(&m, reason.clone());
                record(state, &m, "none", started_at, outcome).await;
            }
            return ready;
        }
    };
    let opts = &opts;
    let concurrency = state.config.outbox_concurrency.max(1);
    let results: Vec<(Claimed, Result<Rendered, SandboxError>)> = futures::stream::iter(deferred)
        .map(|m| async move {
            let result =
                match serde_json::from_value::<Deferred>(m.compose.clone().unwrap_or_default()) {
                    Ok(d) => match (Channel::parse(&m.channel), Purpose::parse(&m.purpose)) {
                        (Some(channel), Some(purpose)) => {
                            let track = m.contact_id.is_some();
                            store::render_deferred(
                                &d,
                                m.tenant_id,
                                m.id,
                                channel,
                                purpose,
                                track,
                                opts,
                            )
                            .await
                        }
                        _ => Err(SandboxError::Render(RenderError {
                            field: "message".into(),
                            message: format!(
                                "unknown channel `{}` or purpose `{}`",
                                m.channel, m.purpose
                            ),
                        })),
                    },
                    Err(e) => Err(SandboxError::Render(RenderError {
                        field: "message".into(),
                        message: format!("the stored template cannot be read: {e}"),
                    })),
                };
            (m, result)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut rendered = Vec::with_capacity(results.len());
    for (m, result) in results {
        match result {
            Ok(r) => rendered.push((m, r)),
            Err(SandboxError::Render(e)) => {
                let reason = format!("template.{}: {}", e.field, e.message);
                fail_unrenderable(state, &m, started_at, reason).await;
            }
            Err(SandboxError::Unavailable(why)) => {
                let reason = format!("the template renderer is unavailable: {why}");
                let outcome = retry_or_fail(&m, reason);
                record(state, &m, "none", started_at, outcome).await;
            }
        }
    }
    let claims: Vec<store::RenderedClaim<'_>> = rendered
        .iter()
        .map(|(m, r)| store::RenderedClaim {
            message: m,
            rendered: r,
        })
        .collect();
    let written = match store::record_rendered(&state.pool, &claims).await {
        Ok(written) => written,
        // Not sent: the leases expire and the sweeper puts the messages back in the queue.
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "cannot record rendered messages");
            return ready;
        }
    };
    drop(claims);
    for (mut m, r) in rendered {
        if !written.contains(&(m.tenant_id, m.id)) {
            tracing::warn!(message_id = %m.id, "lease lost or message erased while rendering; not sent");
            continue;
        }
        m.subject = r.subject;
        m.body_text = r.text;
        m.body_html = r.html;
        // What enqueueing put there (a mail's thread) stays; the render adds its own.
        if let (Some(mine), serde_json::Value::Object(theirs)) =
            (m.extras.as_object_mut(), r.extras)
        {
            mine.extend(theirs);
        }
        m.compose = None;
        ready.push(m);
    }
    ready
}

/// A transient failure: retried with backoff while attempts remain.
fn retry_or_fail(m: &Claimed, reason: String) -> AttemptOutcome {
    outcome_of_error(
        m,
        SendError::Transient {
            reason,
            retry_after: None,
        },
    )
}

/// A message whose template does not render fails with the reason, and the journey that sent
/// it ends with it, in one transaction.
async fn fail_unrenderable(
    state: &AppState,
    m: &Claimed,
    started_at: chrono::DateTime<Utc>,
    reason: String,
) {
    let result = async {
        let mut tx = crate::db::begin(&state.pool).await?;
        let outcome = AttemptOutcome::Failed {
            reason: reason.clone(),
        };
        if !store::record_attempt_in(&mut tx, m, "none", started_at, &outcome).await? {
            tracing::warn!(message_id = %m.id, "lease lost before the outcome was recorded; the new holder decides");
            return Ok(());
        }
        if let (Some(journey), Some(contact)) = (m.journey_id, m.contact_id) {
            let why = format!("send_failed: {reason}");
            journeys::end_unsent(&mut tx, m.tenant_id, contact, journey, m.id, &why).await?;
        }
        tx.commit().await?;
        Ok::<(), StoreError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!(message_id = %m.id, error = %crate::error::error_chain(&e), "cannot record an unrenderable message");
    }
}

/// Sweeps expired leases, then runs rounds until no message is due; for tests and tools.
pub async fn drain(state: &AppState) -> Result<usize, sqlx::Error> {
    store::sweep_expired_leases(&state.pool).await?;
    let mut total = 0;
    loop {
        let n = dispatch_once(state).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

/// One attempt's result, before it is recorded.
struct Attempted {
    message: Claimed,
    provider: &'static str,
    started_at: chrono::DateTime<Utc>,
    outcome: AttemptOutcome,
}

/// Sends one claimed message through its provider (None: an unknown channel) and says what
/// happened; nothing is recorded yet.
async fn attempt(
    state: &AppState,
    m: Claimed,
    provider: Option<Result<Arc<dyn Provider>, SendError>>,
) -> Attempted {
    let started_at = Utc::now();
    let done = |m: Claimed, provider: &'static str, outcome: AttemptOutcome| Attempted {
        message: m,
        provider,
        started_at,
        outcome,
    };
    let (Some(channel), Some(provider)) = (Channel::parse(&m.channel), provider) else {
        let reason = format!("unknown channel `{}`", m.channel);
        return done(m, "none", AttemptOutcome::Failed { reason });
    };
    let provider = match provider {
        Ok(p) => p,
        Err(e) => {
            let outcome = outcome_of_error(&m, e);
            return done(m, "none", outcome);
        }
    };
    let Some(to) = m.recipient.clone() else {
        let reason = "no_address".to_owned();
        return done(m, provider.name(), AttemptOutcome::Failed { reason });
    };
    let outbound = Outbound {
        tenant_id: m.tenant_id,
        message_id: m.id,
        channel,
        to,
        subject: m.subject.clone(),
        text: m.body_text.clone(),
        html: m.body_html.clone(),
        extras: m.extras.clone(),
        idempotency_key: m.id.to_string(),
        marketing: m.purpose == "marketing",
    };
    let timeout = Duration::from_secs(state.config.outbox_send_timeout_secs);
    let result = match tokio::time::timeout(timeout, provider.send(&outbound)).await {
        Ok(r) => r,
        Err(_) => Err(SendError::Transient {
            reason: format!(
                "no answer from {} within {} s",
                provider.name(),
                timeout.as_secs()
            ),
            retry_after: None,
        }),
    };
    let outcome = match result {
        Ok(receipt) => AttemptOutcome::Sent(receipt),
        Err(e) => outcome_of_error(&m, e),
    };
    metrics::counter!("outbox_attempts_total", "channel" => m.channel.clone(),
        "outcome" => match &outcome { AttemptOutcome::Sent(_) => "sent", AttemptOutcome::Retry { .. } => "retry", AttemptOutcome::Throttled { .. } => "throttled", AttemptOutcome::Failed { .. } => "failed" })
    .increment(1);
    done(m, provider.name(), outcome)
}

/// How long a channel waits after a 429 without `Retry-After`.
const THROTTLE_PAUSE: Duration = Duration::from_secs(1);
/// The longest a 429's `Retry-After` holds a channel.
const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(600);

/// Records a round's outcomes: accepted sends together in one transaction, retries and
/// failures one by one. If the batch cannot be written, each is tried alone. A provider's
/// 429 holds the tenant's channel for every worker until the time it asked for.
async fn record_all(state: &AppState, attempted: Vec<Attempted>) {
    let mut accepted = Vec::new();
    for a in attempted {
        if let AttemptOutcome::Throttled { delay, .. } = &a.outcome {
            let until = Utc::now() + chrono::Duration::from_std(*delay).unwrap_or_default();
            if let Err(e) =
                channels::hold_channel(&state.pool, a.message.tenant_id, &a.message.channel, until)
                    .await
            {
                tracing::warn!(error = %e, "cannot hold a throttled channel");
            }
            metrics::counter!("outbox_throttled_total", "channel" => a.message.channel.clone())
                .increment(1);
        }
        match a.outcome {
            AttemptOutcome::Sent(receipt) => accepted.push(store::ProviderAccepted {
                message: a.message,
                provider: a.provider,
                started_at: a.started_at,
                provider_message_id: receipt.provider_message_id,
            }),
            outcome => record(state, &a.message, a.provider, a.started_at, outcome).await,
        }
    }
    if let Err(e) = store::record_sent(&state.pool, &accepted).await {
        tracing::warn!(error = %crate::error::error_chain(&e), "cannot record a batch of sends; recording them one by one");
        for a in accepted {
            let outcome = AttemptOutcome::Sent(crate::channels::Receipt {
                provider_message_id: a.provider_message_id.clone(),
            });
            record(state, &a.message, a.provider, a.started_at, outcome).await;
        }
    }
}

/// A failed attempt: retried with backoff while attempts remain, unless permanent.
fn outcome_of_error(m: &Claimed, e: SendError) -> AttemptOutcome {
    match e {
        SendError::Permanent { reason } => AttemptOutcome::Failed { reason },
        SendError::Throttled {
            reason,
            retry_after,
        } if m.max_attempts < store::MAX_THROTTLED_ATTEMPTS => AttemptOutcome::Throttled {
            reason,
            delay: retry_after
                .unwrap_or(THROTTLE_PAUSE)
                .min(MAX_THROTTLE_PAUSE),
        },
        SendError::Throttled {
            reason,
            retry_after,
        } => outcome_of_error(
            m,
            SendError::Transient {
                reason,
                retry_after,
            },
        ),
        SendError::Transient { reason, .. } if m.attempts >= m.max_attempts => {
            AttemptOutcome::Failed {
                reason: format!("gave up after {} attempts: {reason}", m.attempts),
            }
        }
        SendError::Transient {
            reason,
            retry_after,
        } => AttemptOutcome::Retry {
            reason,
            delay: backoff(m.attempts, retry_after),
        },
    }
}

async fn record(
    state: &AppState,
    m: &Claimed,
    provider: &str,
    started_at: chrono::DateTime<Utc>,
    outcome: AttemptOutcome,
) {
    match store::record_attempt(&state.pool, m, provider, started_at, &outcome).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(message_id = %m.id, "lease lost before the outcome was recorded; the new holder decides")
        }
        // The lease expires and another round retries the message: at-least-once, with the
        // same idempotency key sent to the provider.
        Err(e) => {
            tracing::error!(message_id = %m.id, error = %crate::error::error_chain(&e), "cannot record an attempt's outcome")
        }
    }
}
