//! Broadcasts: one message to every member of a segment, exactly once, on time and at a pace
//! the providers take.
//!
//! Scheduling sets when the walk starts. A worker then takes the broadcast with a lease and
//! walks the tenant's contacts in id order, a page per transaction: membership is decided
//! for the page (the segment's condition as it is then), each member gets one message,
//! queued for its time (`send_at`, or `send_at_local` in the contact's zone, pushed past
//! quiet hours and spaced by the broadcast's `throttle`) or suppressed with the reason
//! (consent, address, frequency cap, open ticket...), and the cursor moves past the page, all
//! in that one transaction and only while the worker still holds the lease at that cursor. A
//! worker that dies loses at most its page in flight, which the next holder decides again;
//! a unique index on (broadcast, contact) makes a second message for a contact impossible.
//! Sending is the outbox's: at least once per message, with the message id as the
//! provider's idempotency key, paced per channel (`channels::pacing`).

pub mod model;
pub mod routes;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use uuid::Uuid;

use self::store::{BroadcastRow, PageCounts};
use crate::AppState;
use crate::campaigns::engine::quiet_until;
use crate::campaigns::model::{FrequencyCap, QuietHours};
use crate::campaigns::store as campaigns;
use crate::contacts::model::Contact;
use crate::domain::{Channel, Purpose, TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::messages::store::{self as messages, BroadcastSend, EnqueueError, Member};
use crate::support::store as support;

/// Contacts decided per transaction of the walk.
pub const PAGE: i64 = 2_000;
/// How long one turn walks before it gives other broadcasts a turn.
const TURN: Duration = Duration::from_secs(5);
/// How long before its time (`send_at`, or `send_at_local` in the earliest zone) a walk
/// starts, so that messages are queued before they are due.
const LEAD: chrono::Duration = chrono::Duration::minutes(15);

/// The channel the broadcasts' workers are woken on when one is scheduled or resumed.
pub const NOTIFY_CHANNEL: &str = "rapport_broadcasts";

/// The instant a wall-clock time has in `tz` (the later hour skipped by a DST gap, the
/// earlier of a repeated one).
pub fn local_instant(local: NaiveDateTime, tz: chrono_tz::Tz) -> DateTime<Utc> {
    tz.from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(local + chrono::Duration::hours(1)))
                .earliest()
        })
        .map_or_else(|| local.and_utc(), |t| t.with_timezone(&Utc))
}

/// A contact's time zone, else the tenant's.
fn zone_of(contact: &Contact, tenant_zone: chrono_tz::Tz) -> chrono_tz::Tz {
    contact
        .timezone
        .as_deref()
        .and_then(|z| z.parse().ok())
        .unwrap_or(tenant_zone)
}

/// When the walk of a broadcast scheduled now starts: [`LEAD`] before its `send_at`, or
/// before its `send_at_local` comes in the earliest of the zones the tenant's contacts live
/// in, so that every message is queued when its time comes; now when it has none.
pub fn starts_at(
    b: &BroadcastRow,
    zones: &[String],
    tenant_zone: chrono_tz::Tz,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    match (b.send_at, b.send_at_local) {
        (Some(at), _) => (at - LEAD).max(now),
        (None, Some(local)) => zones
            .iter()
            .filter_map(|z| z.parse::<chrono_tz::Tz>().ok())
            .chain([tenant_zone])
            .map(|tz| local_instant(local, tz) - LEAD)
            .min()
            .map_or(now, |t| t.max(now)),
        (None, None) => now,
    }
}

/// How a walk decides its members' messages, read once per turn.
struct Plan {
    tenant: TenantContext,
    tenant_zone: chrono_tz::Tz,
    scan: crate::segments::Scan,
    channels: Vec<Channel>,
    purpose: Purpose,
    quiet_hours: Option<QuietHours>,
    frequency_cap: Option<FrequencyCap>,
    spacing: Option<chrono::Duration>,
}

/// Why a turn stopped.
enum Stop {
    /// The walk is over or no longer this worker's.
    Done,
    /// The turn's time is up; the walk goes on at the next turn.
    Turn,
}

/// How long a walk's lease lasts without a page committed: the outbox's
/// (`outbox_lease_secs`), after which another worker takes the walk over.
fn lease(state: &AppState) -> Duration {
    Duration::from_secs(state.config.outbox_lease_secs.max(1))
}

/// One turn of the broadcasts' worker: takes a due broadcast and walks it for up to
/// [`TURN`]; true when it did something (look again at once).
pub async fn round(state: &AppState, holder: Uuid) -> StoreResult<bool> {
    let lease = lease(state);
    let Some(b) = store::claim(&state.pool, holder, lease, state.clock.now()).await? else {
        return Ok(false);
    };
    let (tenant, id) = (b.tenant_id, b.id);
    match walk(state, holder, b).await {
        Ok(Stop::Done) => Ok(true),
        Ok(Stop::Turn) => {
            store::release(&state.pool, tenant, id, holder).await?;
            Ok(true)
        }
        Err(e) => {
            // Not this page: the lease runs out and the walk is taken up again.
            store::release(&state.pool, tenant, id, holder).await?;
            Err(e)
        }
    }
}

/// What the walk needs, read once per turn. The outer error is the database's (the turn is
/// retried); the inner one why the broadcast cannot go on at all (it fails with it).
async fn plan(state: &AppState, b: &BroadcastRow) -> StoreResult<Result<Plan, String>> {
    let mut conn = state.pool.acquire().await?;
    let Some(tenant) = crate::tenants::store::context(&mut conn, b.tenant_id).await? else {
        return Ok(Err("the tenant is gone".to_owned()));
    };
    let source = match (b.segment_id, &b.audience) {
        (Some(segment), _) => {
            match crate::campaigns::store::segment_condition(&mut conn, b.tenant_id, segment)
                .await?
            {
                Some(source) => source,
                None => return Ok(Err("the segment was deleted".to_owned())),
            }
        }
        (None, Some(audience)) => audience.clone(),
        (None, None) => return Ok(Err("the broadcast has no segment or audience".to_owned())),
    };
    let condition = match crate::segments::compile(&source) {
        Ok(condition) => condition,
        Err(e) => return Ok(Err(format!("the condition no longer compiles: {e}"))),
    };
    let tenant_zone = tenant.timezone.parse().unwrap_or(chrono_tz::UTC);
    Ok(Ok(Plan {
        tenant_zone,
        scan: crate::segments::Scan::new(condition),
        channels: b
            .channels
            .iter()
            .filter_map(|c| Channel::parse(c))
            .collect(),
        purpose: b.purpose,
        quiet_hours: b
            .quiet_hours
            .clone()
            .and_then(|q| serde_json::from_value(q).ok()),
        frequency_cap: b
            .frequency_cap
            .clone()
            .and_then(|f| serde_json::from_value(f).ok()),
        spacing: b
            .per_second
            .map(|p| chrono::Duration::microseconds(1_000_000 / i64::from(p.max(1)))),
        tenant,
    }))
}

/// Walks a claimed broadcast page by page for up to [`TURN`].
async fn walk(state: &AppState, holder: Uuid, b: BroadcastRow) -> StoreResult<Stop> {
    let plan = match plan(state, &b).await? {
        Ok(plan) => plan,
        Err(why) => {
            let mut conn = state.pool.acquire().await?;
            store::fail(&mut conn, b.tenant_id, b.id, holder, &why).await?;
            return Ok(Stop::Done);
        }
    };
    let opts = state.send_options().await?;
    let started = Instant::now();
    let mut cursor = b.cursor;
    let mut next_slot = b.next_slot;
    // The next page is read and its members decided while this one is written: reading and
    // evaluating a page costs about as much as writing one, and they use different cores.
    let mut ahead = Ahead(None);
    while started.elapsed() < TURN {
        let page = match ahead.0.take() {
            Some(next) => next
                .await
                .map_err(|e| StoreError::Internal(anyhow::anyhow!("page read stopped: {e}")))??,
            None => decide_page(state.clone(), b.tenant_id, cursor, plan.scan.clone()).await?,
        };
        let Some(last) = page.last else {
            let mut conn = state.pool.acquire().await?;
            store::finish(&mut conn, b.tenant_id, b.id, holder).await?;
            tracing::info!(broadcast = %b.id, tenant = %b.tenant_id, "broadcast walk finished");
            return Ok(Stop::Done);
        };
        ahead.0 = Some(tokio::spawn(decide_page(
            state.clone(),
            b.tenant_id,
            Some(last),
            plan.scan.clone(),
        )));
        let now = state.clock.now();
        let scanned = page.scanned as i64;
        let members = page.members;
        let mut tx = state.pool.begin().await?;
        if !store::advance(
            &mut tx,
            b.tenant_id,
            b.id,
            holder,
            cursor,
            last,
            lease(state),
        )
        .await?
        {
            // Paused, cancelled, or taken over: the page is not ours to write.
            return Ok(Stop::Done);
        }
        let result = page_messages(&mut tx, &plan, &b, &members, &mut next_slot, now, &opts).await;
        let counts = match result {
            Ok(mut counts) => {
                counts.scanned = scanned;
                counts
            }
            Err(EnqueueError::Store(e)) => return Err(e),
            Err(e) => {
                drop(tx);
                let mut conn = state.pool.acquire().await?;
                let why = format!("cannot queue the messages: {e}");
                store::fail(&mut conn, b.tenant_id, b.id, holder, &why).await?;
                return Ok(Stop::Done);
            }
        };
        store::add_counts(&mut tx, b.tenant_id, b.id, &counts, next_slot).await?;
        tx.commit().await?;
        metrics::counter!("broadcast_members_total").increment(counts.targeted as u64);
        cursor = Some(last);
    }
    Ok(Stop::Turn)
}

/// The page of the tenant's contacts after `cursor`, with the members among them now
/// (membership is decided here, once per page).
async fn decide_page(
    state: AppState,
    tenant: TenantId,
    cursor: Option<Uuid>,
    scan: crate::segments::Scan,
) -> StoreResult<crate::segments::Page> {
    let now = state.clock.now();
    crate::segments::page(&state.pool, tenant, cursor, PAGE, &scan, now).await
}

/// A page being read ahead; dropped (a turn ends, the walk stops), its read is abandoned.
struct Ahead(Option<tokio::task::JoinHandle<StoreResult<crate::segments::Page>>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Decides a page's members and queues their messages in the walk's transaction.
async fn page_messages(
    tx: &mut sqlx::PgConnection,
    plan: &Plan,
    b: &BroadcastRow,
    members: &[Contact],
    next_slot: &mut Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    opts: &messages::SendOptions,
) -> Result<PageCounts, EnqueueError> {
    let mut counts = PageCounts::default();
    if members.is_empty() {
        return Ok(counts);
    }
    let ids: Vec<Uuid> = members.iter().map(|c| c.id).collect();
    let marketing = plan.purpose == Purpose::Marketing;
    let open: HashSet<Uuid> = if marketing && b.suppress_while_ticket_open {
        support::with_open_tickets(tx, b.tenant_id, &ids).await?
    } else {
        HashSet::new()
    };
    let recent = match (&plan.frequency_cap, marketing) {
        (Some(cap), true) => {
            campaigns::count_marketing_sends_many(
                tx,
                b.tenant_id,
                &ids,
                now - cap.per.as_chrono(),
                now,
            )
            .await?
        }
        _ => Default::default(),
    };
    let mut deferred = HashSet::new();
    let mut decided = Vec::with_capacity(members.len());
    for contact in members {
        let suppress = if open.contains(&contact.id) {
            Some("ticket_open")
        } else if let Some(cap) = &plan.frequency_cap
            && marketing
            && recent.get(&contact.id).copied().unwrap_or(0) >= i64::from(cap.max)
        {
            Some("frequency_cap")
        } else {
            None
        };
        let tz = zone_of(contact, plan.tenant_zone);
        let mut at = match (b.send_at, b.send_at_local) {
            (_, Some(local)) => local_instant(local, tz),
            (Some(at), None) => at,
            (None, None) => now,
        }
        .max(now);
        if suppress.is_none()
            && let Some(q) = &plan.quiet_hours
            && let Some(until) = quiet_until(q, tz, at)
        {
            at = until;
            deferred.insert(contact.id);
        }
        if suppress.is_none()
            && let Some(spacing) = plan.spacing
        {
            let slot = next_slot.map_or(at, |s| s.max(at));
            at = slot;
            *next_slot = Some(slot + spacing);
        }
        decided.push(Member {
            contact,
            suppress,
            send_at: at,
        });
    }
    let send = BroadcastSend {
        broadcast_id: b.id,
        template_key: &b.template_key,
        channels: &plan.channels,
        purpose: Some(plan.purpose),
        vars: serde_json::Value::Object(
            b.variables
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .chain([(
                    "broadcast".to_owned(),
                    serde_json::json!({"id": b.id, "name": b.name}),
                )])
                .collect(),
        ),
    };
    let outcomes = messages::enqueue_broadcast(tx, &plan.tenant, &send, &decided, opts).await?;
    let at_of: std::collections::HashMap<Uuid, DateTime<Utc>> =
        decided.iter().map(|m| (m.contact.id, m.send_at)).collect();
    let mut capped = Vec::new();
    let mut suppressed: BTreeMap<String, i64> = BTreeMap::new();
    for o in &outcomes {
        counts.targeted += 1;
        match &o.suppressed {
            None => {
                counts.queued += 1;
                if deferred.contains(&o.contact_id) {
                    counts.deferred += 1;
                }
                if o.purpose == Purpose::Marketing {
                    let at = at_of.get(&o.contact_id).copied().unwrap_or(now);
                    capped.push((o.contact_id, o.message_id, at));
                }
            }
            Some(reason) => *suppressed.entry(reason_key(reason)).or_default() += 1,
        }
    }
    campaigns::record_broadcast_sends(tx, b.tenant_id, b.id, &capped).await?;
    counts.suppressed = suppressed;
    Ok(counts)
}

/// The reason a suppressed member is counted under: a message's reason names each channel
/// tried (`sms: no_address; email: no_consent`); the count takes the one that matters most
/// (an opt-out over a missing consent over a bounce over a missing address).
pub fn reason_key(reason: &str) -> String {
    const ORDER: [&str; 7] = [
        "ticket_open",
        "frequency_cap",
        "opted_out",
        "no_consent",
        "bounced",
        "no_address",
        "no_variant",
    ];
    if let Some(found) = ORDER.iter().find(|r| reason.contains(*r)) {
        return (*found).to_owned();
    }
    reason
        .split(':')
        .next()
        .unwrap_or("suppressed")
        .trim()
        .to_owned()
}
