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
//! worker that dies loses at most its pages in flight, which the next holder decides again;
//! a unique index on (broadcast, contact) makes a second message for a contact impossible.
//! Sending is the outbox's: at least once per message, with the message id as the
//! provider's idempotency key, paced per channel (`channels::pacing`).

pub mod model;
pub mod routes;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use tokio::sync::oneshot;
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
    // Members are read without their counters (a quarter of the read's cost) unless the
    // condition or the template reads them; a missing template fails the first page.
    let mut scan = crate::segments::Scan::new(condition);
    if crate::templates::store::get(&mut conn, b.tenant_id, &b.template_key)
        .await?
        .is_some_and(|t| crate::templates::render::reads_contact_stats(&t.variants))
    {
        scan = scan.reading_stats();
    }
    Ok(Ok(Plan {
        tenant_zone,
        scan,
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
///
/// Three things overlap: the next page is read and its members decided while this one is
/// written (reading and evaluating a page costs about as much as writing one, and they use
/// different cores), and up to [`WRITERS`] pages are written at once, each in its own
/// transaction on its own connection. A page's transaction moves the cursor last, from the
/// page before's end to its own, after the page before has moved it (each page waits for that
/// signal, and the row lock orders the commits): if a page fails, is rolled back, or the walk
/// was paused, cancelled or taken over meanwhile, the cursor is not where the next page
/// expects and that page rolls back too. A broadcast with a `throttle` is written one page at
/// a time, since each page's slots follow the last one's.
async fn walk(state: &AppState, holder: Uuid, b: BroadcastRow) -> StoreResult<Stop> {
    let plan = match plan(state, &b).await? {
        Ok(plan) => Arc::new(plan),
        Err(why) => {
            let mut conn = state.pool.acquire().await?;
            store::fail(&mut conn, b.tenant_id, b.id, holder, &why).await?;
            return Ok(Stop::Done);
        }
    };
    let b = Arc::new(b);
    let opts = Arc::new(state.send_options().await?);
    let depth = if plan.spacing.is_some() { 1 } else { WRITERS };
    let started = Instant::now();
    let mut cursor = b.cursor;
    let mut ahead = Ahead(None);
    let mut writing = Writing {
        state: state.clone(),
        holder,
        b: b.clone(),
        pages: std::collections::VecDeque::new(),
        next_slot: b.next_slot,
    };
    // The signal the page before sends once it has moved the cursor (true) or cannot (false).
    let mut moved: Option<oneshot::Receiver<bool>> = None;
    while started.elapsed() < TURN {
        let page = match ahead.0.take() {
            Some(next) => next
                .await
                .map_err(|e| StoreError::Internal(anyhow::anyhow!("page read stopped: {e}")))??,
            None => decide_page(state.clone(), b.tenant_id, cursor, plan.scan.clone()).await?,
        };
        let Some(last) = page.last else {
            if let Some(stop) = writing.drain().await? {
                return Ok(stop);
            }
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
        let (signal, next_moved) = oneshot::channel();
        let write = PageWrite {
            state: state.clone(),
            holder,
            plan: plan.clone(),
            b: b.clone(),
            opts: opts.clone(),
            page,
            from: cursor,
            to: last,
            next_slot: writing.next_slot,
            after: moved.replace(next_moved),
            moved: signal,
        };
        writing.pages.push_back(tokio::spawn(write.run()));
        cursor = Some(last);
        while writing.pages.len() >= depth {
            if let Some(stop) = writing.next().await? {
                return Ok(stop);
            }
        }
    }
    match writing.drain().await? {
        Some(stop) => Ok(stop),
        None => Ok(Stop::Turn),
    }
}

/// Pages written at once by one walk, each on its own connection.
const WRITERS: usize = 2;

/// How a page's write ended.
enum Written {
    /// Committed; the broadcast's next free slot after it.
    Page(Option<DateTime<Utc>>),
    /// Not ours to write: paused, cancelled or taken over, or the page before was not written.
    NotOurs,
    /// The broadcast cannot go on, for this reason.
    Fails(String),
}

/// One page's messages, queued in a transaction of its own.
struct PageWrite {
    state: AppState,
    holder: Uuid,
    plan: Arc<Plan>,
    b: Arc<BroadcastRow>,
    opts: Arc<messages::SendOptions>,
    page: crate::segments::Page,
    from: Option<Uuid>,
    to: Uuid,
    next_slot: Option<DateTime<Utc>>,
    /// The page before's signal that it moved the cursor to `from`; None for the turn's first.
    after: Option<oneshot::Receiver<bool>>,
    /// This page's signal to the next.
    moved: oneshot::Sender<bool>,
}

impl PageWrite {
    /// Queues the members' messages, then (once the page before has moved the cursor) moves
    /// the cursor past the page, adds its counts and commits. The signal is dropped unsent
    /// when it fails before moving the cursor, which the next page reads as "not moved".
    async fn run(self) -> StoreResult<Written> {
        let PageWrite {
            state,
            holder,
            plan,
            b,
            opts,
            page,
            from,
            to,
            mut next_slot,
            after,
            moved,
        } = self;
        let now = state.clock.now();
        let mut tx = crate::db::begin(&state.pool).await?;
        let result = page_messages(
            &mut tx,
            &plan,
            &b,
            &page.members,
            &mut next_slot,
            now,
            &opts,
        )
        .await;
        let mut counts = match result {
            Ok(counts) => counts,
            Err(EnqueueError::Store(e)) => return Err(e),
            Err(e) => return Ok(Written::Fails(format!("cannot queue the messages: {e}"))),
        };
        counts.scanned = page.scanned as i64;
        if let Some(after) = after
            && !after.await.unwrap_or(false)
        {
            return Ok(Written::NotOurs);
        }
        // Waits for the page before's commit when it holds the row; false when the cursor is
        // not at `from` then (that page rolled back) or the walk is no longer ours.
        let ours =
            store::advance(&mut tx, b.tenant_id, b.id, holder, from, to, lease(&state)).await?;
        let _ = moved.send(ours);
        if !ours {
            return Ok(Written::NotOurs);
        }
        store::add_counts(&mut tx, b.tenant_id, b.id, &counts, next_slot).await?;
        tx.commit().await?;
        metrics::counter!("broadcast_members_total").increment(counts.targeted as u64);
        Ok(Written::Page(next_slot))
    }
}

/// The pages being written, oldest first. Dropped with pages in flight (a walk's error), they
/// go on by themselves: each commits only where the cursor and the lease say it may.
struct Writing {
    state: AppState,
    holder: Uuid,
    b: Arc<BroadcastRow>,
    pages: std::collections::VecDeque<tokio::task::JoinHandle<StoreResult<Written>>>,
    /// The broadcast's next free slot after the last page committed.
    next_slot: Option<DateTime<Utc>>,
}

impl Writing {
    /// Waits for the oldest page's write: None when it was committed (or there was none),
    /// else why the walk stops, after every later page has ended too.
    async fn next(&mut self) -> StoreResult<Option<Stop>> {
        let Some(task) = self.pages.pop_front() else {
            return Ok(None);
        };
        let written = task
            .await
            .map_err(|e| StoreError::Internal(anyhow::anyhow!("page write stopped: {e}")));
        let stop = match written {
            Ok(Ok(Written::Page(slot))) => {
                self.next_slot = slot;
                return Ok(None);
            }
            Ok(Ok(Written::NotOurs)) => Ok(None),
            Ok(Ok(Written::Fails(why))) => Ok(Some(why)),
            Ok(Err(e)) | Err(e) => Err(e),
        };
        // The later pages follow this one's cursor, which did not move: they roll back.
        for task in self.pages.drain(..) {
            let _ = task.await;
        }
        match stop? {
            None => Ok(Some(Stop::Done)),
            Some(why) => {
                let mut conn = self.state.pool.acquire().await?;
                let b = &self.b;
                store::fail(&mut conn, b.tenant_id, b.id, self.holder, &why).await?;
                Ok(Some(Stop::Done))
            }
        }
    }

    /// Waits for every page in flight; what [`Writing::next`] says of the first that did not
    /// commit.
    async fn drain(&mut self) -> StoreResult<Option<Stop>> {
        while !self.pages.is_empty() {
            if let Some(stop) = self.next().await? {
                return Ok(Some(stop));
            }
        }
        Ok(None)
    }
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
        members_have_stats: plan.scan.reads_stats(),
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
