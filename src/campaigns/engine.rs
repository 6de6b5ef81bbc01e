//! The rule engine: consumes new events in order per contact, enrols contacts, and runs
//! journeys step by step.
//!
//! Everything about one contact happens in one transaction that holds an advisory lock on the
//! contact: its pending events (in arrival order), then its due journeys. Two events of one
//! contact never race, an enrolment and its first send commit together, and any number of
//! workers can run. Journeys are rows with a `wake_at` in clock time; a timer wake is just a
//! due row. The engine reads the time from [`crate::clock::Clock`], so tests run days of a
//! journey in milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::cel as facts;
use super::model::{AgentChoice, Definition, QuietHours, Reentry, Schedule, Step};
use super::store::parse_definition;
use crate::AppState;
use crate::contacts::model::Contact;
use crate::contacts::store as contacts;
use crate::domain::{Channel, Purpose};
use crate::domain::{TenantContext, TenantId};
use crate::error::StoreError;
use crate::events::store as events;
use crate::messages::model::Compose;
use crate::messages::store::EnqueueError;
use crate::messages::store::{self as messages, SendOptions};
use crate::support::model::open_ticket_statuses;
use crate::support::store as support;
use crate::templates::store as templates;

/// Why a round of the engine stopped; the worker logs it and tries again next round.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A message could not be queued for a reason a retry may cure (the renderer is down).
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        EngineError::Store(e.into())
    }
}

type EngineResult<T> = Result<T, EngineError>;

/// Most events consumed in one transaction (by all its contacts). With ten campaigns matching
/// each event, that is a few thousand journeys and decisions written at its commit.
const EVENTS_PER_TX: i64 = 200;
/// After this many failed evaluations an event is set aside (and logged) so it cannot block
/// the contact's later events for ever.
const MAX_FAILURES: i32 = 5;
/// How often a send held by an open ticket is looked at again (ticket events also wake it).
const HOLD_RECHECK: chrono::Duration = chrono::Duration::hours(1);

/// Campaign versions are immutable, so each is read and compiled once per process.
#[derive(Default)]
pub struct Definitions {
    cache: Mutex<HashMap<(Uuid, i32), Arc<Definition>>>,
}

impl Definitions {
    /// The definition of a campaign version, compiled.
    pub async fn get(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        campaign: Uuid,
        version: i32,
    ) -> EngineResult<Arc<Definition>> {
        if let Some(def) = self.lock().get(&(campaign, version)) {
            return Ok(def.clone());
        }
        let raw: Value = sqlx::query_scalar(
            "SELECT definition FROM campaign_versions
             WHERE tenant_id = $1 AND campaign_id = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(campaign)
        .bind(version)
        .fetch_one(conn)
        .await?;
        let def = Arc::new(parse_definition(raw)?);
        let mut cache = self.lock();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert((campaign, version), def.clone());
        Ok(def)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, i32), Arc<Definition>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one round of the engine did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Events consumed.
    pub events: usize,
    /// Contacts whose journeys ran.
    pub contacts: usize,
    /// Contacts enrolled by a schedule.
    pub scheduled: usize,
}

impl Round {
    pub fn is_idle(&self) -> bool {
        self.events == 0 && self.contacts == 0 && self.scheduled == 0
    }
}

/// A scheduled enrolment to look at: campaign, version, occurrence key (`birthday:2026`).
type Scheduled = (Uuid, i32, String);

/// Contacts evaluated together in one transaction while evaluation keeps up: each has an
/// event or two waiting, and transactions of fewer contacts would spend more of their time on
/// round trips and commits than on the events.
const CONTACTS_PER_TX: usize = 200;
/// Contacts evaluated together in one transaction during a backlog (at least
/// [`BACKLOG_DEPTH`] events waiting): each contact is likely to have several events waiting,
/// and fewer contacts fill a transaction's [`EVENTS_PER_TX`] with fewer contacts to load.
const CONTACTS_PER_TX_BACKLOG: usize = 50;
/// How many events waiting in the inbox make a backlog.
const BACKLOG_DEPTH: i64 = 10 * ROUND_SIZE;
/// Transactions of the engine open at once (one process).
const PARALLEL_TX: usize = 2;
/// Most inbox events (and most due journeys) one round looks at.
const ROUND_SIZE: i64 = 1000;

/// One round: contacts with new events, contacts with due journeys, and (when asked) the
/// schedules. Returns what it did; zero everywhere means there was nothing to do.
///
/// Contacts are evaluated by tenant in chunks of [`CONTACTS_PER_TX`] (of
/// [`CONTACTS_PER_TX_BACKLOG`] during a backlog), each chunk in one transaction with a fixed
/// number of statements for its loads and its writes; a chunk that fails is evaluated again
/// contact by contact, so one contact's failure is only its own.
pub async fn round(state: &AppState, schedules: bool) -> EngineResult<Round> {
    let now = state.clock.now();
    let mut done = Round::default();
    // The oldest events first (the inbox's order index), then the journeys due first.
    // With each contact, the first sequence number of the round and the inbox's last one: how
    // many events are waiting, counting those that arrived while the round was read.
    let pending: Vec<(TenantId, Uuid, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, contact_id, min(seq), (SELECT max(seq) FROM campaign_inbox) FROM (
            SELECT tenant_id, contact_id, seq FROM campaign_inbox WHERE failures < $1
            ORDER BY seq LIMIT $2) oldest
         GROUP BY tenant_id, contact_id ORDER BY min(seq)",
    )
    .bind(MAX_FAILURES)
    .bind(ROUND_SIZE)
    .fetch_all(&state.pool)
    .await?;
    let waiting = pending.first().map_or(0, |p| p.3 - p.2 + 1);
    let per_tx = if waiting >= BACKLOG_DEPTH {
        CONTACTS_PER_TX_BACKLOG
    } else {
        CONTACTS_PER_TX
    };
    let due: Vec<(TenantId, Uuid)> = sqlx::query_as(
        "SELECT DISTINCT tenant_id, contact_id FROM (
            SELECT j.tenant_id, j.contact_id FROM journeys j
              JOIN campaigns c ON c.tenant_id = j.tenant_id AND c.id = j.campaign_id
             WHERE j.status = 'active' AND j.wake_at <= $1 AND c.status = 'active'
             ORDER BY j.wake_at LIMIT $2) due",
    )
    .bind(now)
    .bind(ROUND_SIZE)
    .fetch_all(&state.pool)
    .await?;
    let mut seen = std::collections::HashSet::with_capacity(pending.len() + due.len());
    let mut contacts: Vec<(TenantId, Uuid)> = pending
        .into_iter()
        .map(|(tenant, contact, _, _)| (tenant, contact))
        .chain(due)
        .filter(|c| seen.insert(*c))
        .collect();
    contacts.sort_by_key(|c| c.0.0);
    let mut chunks: Vec<(TenantId, Vec<Uuid>)> = Vec::new();
    for (tenant, contact) in contacts {
        match chunks.last_mut() {
            Some((t, ids)) if *t == tenant && ids.len() < per_tx => ids.push(contact),
            _ => chunks.push((tenant, vec![contact])),
        }
    }
    let results: Vec<Processed> = futures::stream::iter(chunks)
        .map(|(tenant, ids)| process_chunk(state, tenant, ids))
        .buffer_unordered(PARALLEL_TX)
        .collect()
        .await;
    for r in results {
        done.events += r.events;
        done.contacts += r.ran;
    }
    if schedules {
        done.scheduled = run_schedules(state, now).await?;
    }
    Ok(done)
}

/// What evaluating contacts did.
#[derive(Debug, Default, Clone, Copy)]
struct Processed {
    /// Inbox events consumed.
    events: usize,
    /// Contacts whose due journeys ran.
    ran: usize,
}

impl std::ops::AddAssign for Processed {
    fn add_assign(&mut self, other: Processed) {
        self.events += other.events;
        self.ran += other.ran;
    }
}

/// A chunk of one tenant's contacts in one transaction, else one by one.
async fn process_chunk(state: &AppState, tenant: TenantId, contacts: Vec<Uuid>) -> Processed {
    if contacts.len() == 1 {
        return process_contact_logged(state, tenant, contacts[0], &[])
            .await
            .unwrap_or_default();
    }
    let started = std::time::Instant::now();
    let batch: Vec<(Uuid, &[Scheduled])> = contacts.iter().map(|c| (*c, &[][..])).collect();
    match process_contacts(state, tenant, &batch).await {
        Ok(p) => {
            metrics::histogram!("campaign_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            p
        }
        Err(e) => {
            tracing::debug!(%tenant, error = %e, "a chunk of contacts failed; evaluating them one by one");
            let mut total = Processed::default();
            for contact in contacts {
                if let Some(p) = process_contact_logged(state, tenant, contact, &[]).await {
                    total += p;
                }
            }
            total
        }
    }
}

async fn process_contact_logged(
    state: &AppState,
    tenant: TenantId,
    contact: Uuid,
    scheduled: &[Scheduled],
) -> Option<Processed> {
    let started = std::time::Instant::now();
    let result = process_contacts(state, tenant, &[(contact, scheduled)]).await;
    metrics::histogram!("campaign_batch_duration_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(%tenant, %contact, error = %e, "campaign evaluation failed; will retry");
            metrics::counter!("campaign_evaluation_failures_total").increment(1);
            let bumped = sqlx::query(
                "UPDATE campaign_inbox SET failures = failures + 1
                 WHERE tenant_id = $1 AND contact_id = $2",
            )
            .bind(tenant)
            .bind(contact)
            .execute(&state.pool)
            .await;
            if let Err(e) = bumped {
                tracing::warn!(error = %e, "cannot count the failed evaluation");
            }
            // Due journeys that failed are looked at again in a minute, not in a tight loop.
            let now = state.clock.now();
            let deferred = sqlx::query(
                "UPDATE journeys SET wake_at = $3 + interval '1 minute'
                 WHERE tenant_id = $1 AND contact_id = $2 AND status = 'active' AND wake_at <= $3",
            )
            .bind(tenant)
            .bind(contact)
            .bind(now)
            .execute(&state.pool)
            .await;
            if let Err(e) = deferred {
                tracing::warn!(error = %e, "cannot defer the failed journeys");
            }
            None
        }
    }
}

/// An event as the engine reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Pending {
    seq: i64,
    id: Uuid,
    #[sqlx(rename = "type")]
    kind: String,
    properties: Value,
    occurred_at: DateTime<Utc>,
    ordinal: i64,
    source: String,
    subject_id: Option<Uuid>,
}

/// A pending event and its contact, as loaded for a chunk.
#[derive(Debug, sqlx::FromRow)]
struct PendingOf {
    contact_id: Uuid,
    #[sqlx(flatten)]
    event: Pending,
}

/// A running journey.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Journey {
    id: Uuid,
    campaign_id: Uuid,
    version: i32,
    contact_id: Uuid,
    status: String,
    position: Vec<i32>,
    wake_at: Option<DateTime<Utc>>,
    wait_until: Option<DateTime<Utc>>,
    held_since: Option<DateTime<Utc>>,
    trigger_event: Value,
    last_message_id: Option<Uuid>,
    exit_reason: Option<String>,
    converted: bool,
    /// Changed since it was read (or written): saved at the commit.
    #[sqlx(skip)]
    dirty: bool,
    /// Not in the database yet: inserted at the commit, in its state then.
    #[sqlx(skip)]
    new: Option<Enrolment>,
}

/// What a journey inserted at the commit starts from.
#[derive(Debug, Clone)]
struct Enrolment {
    key: String,
    trigger_event_id: Option<Uuid>,
    enrolled_at: DateTime<Utc>,
}

const JOURNEY_COLUMNS: &str = "id, campaign_id, version, contact_id, status, position, wake_at,
    wait_until, held_since, trigger_event, last_message_id, exit_reason, converted";

/// Everything the steps of one contact's journeys need.
struct Scope<'a> {
    state: &'a AppState,
    tenant: &'a TenantContext,
    contact: Contact,
    /// The contact as conditions see it (current values).
    facts: Value,
    opts: &'a SendOptions,
    now: DateTime<Utc>,
    /// Status of each running campaign (active or paused) and its current version.
    campaigns: &'a HashMap<Uuid, (String, i32, String)>,
    /// The engine's own `campaign.*` events, appended together before the commit.
    emitted: Mutex<Vec<events::Emitted>>,
    /// When the contact last enrolled in each running campaign that re-enrols only after a
    /// while (`reentry: "30d"`), kept up to date as this evaluation enrols.
    last_enrolled: Mutex<HashMap<Uuid, DateTime<Utc>>>,
}

impl Scope<'_> {
    fn last_enrolled(&self, campaign: Uuid) -> Option<DateTime<Utc>> {
        let last = self.last_enrolled.lock().unwrap_or_else(|e| e.into_inner());
        last.get(&campaign).copied()
    }

    /// Notes an enrolment made now, for the reentry checks that follow in this evaluation.
    fn enrolled(&self, campaign: Uuid) {
        let mut last = self.last_enrolled.lock().unwrap_or_else(|e| e.into_inner());
        last.insert(campaign, self.now);
    }

    /// Puts a decision about a journey on the contact's timeline (at the commit).
    fn emit(&self, kind: &'static str, properties: Value, journey: Uuid) {
        let event = events::Emitted {
            tenant: self.tenant.id,
            contact_id: self.contact.id,
            kind,
            properties,
            subject: Some(("journey", journey)),
        };
        self.emitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

/// Consumes the pending events and runs the due journeys of some of a tenant's contacts, in
/// one transaction under each contact's advisory lock; `scheduled` enrolments are looked at
/// too. Contacts another worker holds are skipped (they are being done). Loads and writes are
/// one statement each for all the contacts; only steps that send, hand over to an agent or
/// enrol once-only take statements of their own.
async fn process_contacts(
    state: &AppState,
    tenant_id: TenantId,
    batch: &[(Uuid, &[Scheduled])],
) -> EngineResult<Processed> {
    let mut tx = state.pool.begin().await?;
    let keys: Vec<i64> = batch
        .iter()
        .map(|(c, _)| contact_lock_key(tenant_id, *c))
        .collect();
    let locked: std::collections::HashSet<i64> = sqlx::query_scalar(
        "SELECT k FROM unnest($1::int8[]) AS u(k) WHERE pg_try_advisory_xact_lock(k)",
    )
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let batch: Vec<&(Uuid, &[Scheduled])> = batch
        .iter()
        .filter(|(c, _)| locked.contains(&contact_lock_key(tenant_id, *c)))
        .collect();
    if batch.is_empty() {
        return Ok(Processed::default());
    }
    let ids: Vec<Uuid> = batch.iter().map(|(c, _)| *c).collect();
    let now = state.clock.now();
    // In inbox order, so each contact gets the oldest of its events.
    let rows: Vec<PendingOf> = sqlx::query_as(
        "SELECT i.contact_id, i.seq, e.id, e.type, e.properties, e.occurred_at, e.ordinal,
                e.source, e.subject_id
         FROM campaign_inbox i JOIN events e ON e.tenant_id = i.tenant_id AND e.id = i.event_id
         WHERE i.tenant_id = $1 AND i.contact_id = ANY($2) AND i.failures < $3
         ORDER BY i.seq LIMIT $4",
    )
    .bind(tenant_id)
    .bind(&ids)
    .bind(MAX_FAILURES)
    .bind(EVENTS_PER_TX)
    .fetch_all(&mut *tx)
    .await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.event.seq).collect();
    let mut pending: HashMap<Uuid, Vec<Pending>> = HashMap::new();
    for r in rows {
        pending.entry(r.contact_id).or_default().push(r.event);
    }
    let mut found: HashMap<Uuid, Contact> = contacts::get_many(&mut tx, tenant_id, &ids)
        .await?
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    // Erased: nothing more may happen to these contacts.
    let erased: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|c| !found.contains_key(c))
        .collect();
    forget_contacts(&mut tx, tenant_id, &erased, now).await?;
    let mut done = Processed {
        events: seqs.len(),
        ran: 0,
    };
    if !found.is_empty() {
        let tenant = crate::tenants::store::context(&mut tx, tenant_id)
            .await?
            .ok_or_else(|| {
                StoreError::Internal(anyhow::anyhow!("tenant {tenant_id} is missing"))
            })?;
        let campaigns: HashMap<Uuid, (String, i32, String)> =
            sqlx::query_as::<_, (Uuid, String, i32, String)>(
                "SELECT id, status, version, name FROM campaigns
                 WHERE tenant_id = $1 AND status IN ('active', 'paused')",
            )
            .bind(tenant_id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(id, status, version, name)| (id, (status, version, name)))
            .collect();
        let opts = state.send_options().await?;
        let sql = format!(
            "SELECT {JOURNEY_COLUMNS} FROM journeys
             WHERE tenant_id = $1 AND contact_id = ANY($2) AND status = 'active'
             ORDER BY id FOR UPDATE"
        );
        let mut journeys: HashMap<Uuid, Vec<Journey>> = HashMap::new();
        for j in sqlx::query_as::<_, Journey>(&sql)
            .bind(tenant_id)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
        {
            journeys.entry(j.contact_id).or_default().push(j);
        }
        // When each contact last enrolled in the active campaigns (the only ones that enrol)
        // that re-enrol only after a while: one look-up for the chunk, not one per enrolment.
        let mut timed = Vec::new();
        for (id, (_, version, _)) in campaigns.iter().filter(|(_, c)| c.0 == "active") {
            let def = state
                .campaigns
                .get(&mut tx, tenant_id, *id, *version)
                .await?;
            if matches!(def.reentry, Reentry::After(_)) {
                timed.push(*id);
            }
        }
        let mut last_enrolled: HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>> = HashMap::new();
        if !timed.is_empty() {
            for (contact, campaign, at) in sqlx::query_as::<_, (Uuid, Uuid, DateTime<Utc>)>(
                "SELECT contact_id, campaign_id, max(enrolled_at) FROM journeys
                 WHERE tenant_id = $1 AND campaign_id = ANY($2) AND contact_id = ANY($3)
                 GROUP BY contact_id, campaign_id",
            )
            .bind(tenant_id)
            .bind(&timed)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            {
                last_enrolled
                    .entry(contact)
                    .or_default()
                    .insert(campaign, at);
            }
        }
        let mut emitted = Vec::new();
        let mut touched: Vec<Journey> = Vec::new();
        for (contact_id, scheduled) in batch {
            let Some(contact) = found.remove(contact_id) else {
                continue;
            };
            let scope = Scope {
                state,
                tenant: &tenant,
                facts: serde_json::to_value(&contact)
                    .map_err(|e| StoreError::Internal(anyhow::anyhow!("serialise contact: {e}")))?,
                contact,
                opts: &opts,
                now,
                campaigns: &campaigns,
                emitted: Mutex::new(Vec::new()),
                last_enrolled: Mutex::new(last_enrolled.remove(contact_id).unwrap_or_default()),
            };
            let events_of = pending.remove(contact_id).unwrap_or_default();
            let mut mine = journeys.remove(contact_id).unwrap_or_default();
            let ran = evaluate(&mut tx, &scope, &mut mine, &events_of, scheduled).await?;
            done.ran += usize::from(ran);
            touched.extend(mine.into_iter().filter(|j| j.dirty));
            emitted.extend(
                scope
                    .emitted
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
        save_journeys(&mut tx, tenant_id, &touched, now).await?;
        events::append_many(&mut tx, &emitted).await?;
    }
    if !seqs.is_empty() {
        sqlx::query("DELETE FROM campaign_inbox WHERE tenant_id = $1 AND seq = ANY($2)")
            .bind(tenant_id)
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if !seqs.is_empty() {
        metrics::counter!("campaign_events_consumed_total").increment(seqs.len() as u64);
    }
    Ok(done)
}

/// One contact: its pending events against its journeys and the running campaigns, the
/// scheduled enrolments, then its due journeys. True when a due journey ran.
async fn evaluate(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    journeys: &mut Vec<Journey>,
    pending: &[Pending],
    scheduled: &[Scheduled],
) -> EngineResult<bool> {
    let (state, tenant_id, contact_id, now) =
        (scope.state, scope.tenant.id, scope.contact.id, scope.now);
    // Conditions see the contact as it was at each event, not as it is now: rewind the
    // pending events' changes and counts, then replay them one by one.
    let mut as_of = rewind(&scope.facts, pending);
    for event in pending {
        consume(conn, scope, journeys, event, &mut as_of).await?;
    }
    for (campaign, version, key) in scheduled {
        sqlx::query(
            "INSERT INTO schedule_marks (tenant_id, campaign_id, contact_id, occurrence)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(tenant_id)
        .bind(campaign)
        .bind(contact_id)
        .bind(key)
        .execute(&mut *conn)
        .await?;
        let def = state
            .campaigns
            .get(conn, tenant_id, *campaign, *version)
            .await?;
        let contact = facts::contact(&scope.facts);
        let ev = facts::event("schedule", &json!({}), now, 1, "rapport");
        if def
            .audience
            .as_ref()
            .is_none_or(|a| facts::holds(a, &contact, &ev, now))
        {
            let trigger =
                json!({"type": "schedule", "schedule": def.trigger.schedule, "occurrence": key});
            enrol(
                conn, scope, journeys, *campaign, *version, key, None, trigger,
            )
            .await?;
        }
    }
    let mut ran = false;
    for journey in journeys.iter_mut() {
        let running = scope
            .campaigns
            .get(&journey.campaign_id)
            .is_some_and(|c| c.0 == "active");
        if journey.status == "active" && running && journey.wake_at.is_some_and(|w| w <= now) {
            advance(conn, scope, journey).await?;
            ran = true;
        }
    }
    Ok(ran)
}

/// The advisory lock that serialises everything the engine does for one contact.
fn contact_lock_key(tenant: TenantId, contact: Uuid) -> i64 {
    let t = tenant.0.as_u64_pair();
    let c = contact.as_u64_pair();
    (t.0 ^ t.1 ^ c.0.rotate_left(17) ^ c.1) as i64
}

/// Erased contacts' journeys end (their pending events are dropped with the others').
async fn forget_contacts(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
    now: DateTime<Utc>,
) -> EngineResult<()> {
    if contacts.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE journeys SET status = 'exited', exit_reason = 'contact_erased', ended_at = $3,
            wake_at = NULL, updated_at = now()
         WHERE tenant_id = $1 AND contact_id = ANY($2) AND status = 'active'",
    )
    .bind(tenant)
    .bind(contacts)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// The contact as it was just after (`new`) or just before (`old`) a `contact.updated`
/// event: the event's changes applied over the current values.
fn contact_as_of(current: &Value, event: &Pending, side: &str) -> Value {
    let mut contact = current.clone();
    let changes = event.properties.get("changes").and_then(Value::as_object);
    for (path, change) in changes.into_iter().flatten() {
        let value = change.get(side).cloned().unwrap_or(Value::Null);
        let parts: Vec<&str> = path.split('.').collect();
        let Some((last, parents)) = parts.split_last() else {
            continue;
        };
        let mut node = &mut contact;
        for p in parents {
            if !node.get(*p).is_some_and(Value::is_object) {
                node[*p] = json!({});
            }
            node = &mut node[*p];
        }
        if let Some(map) = node.as_object_mut() {
            if value.is_null() && !parents.is_empty() {
                map.remove(*last);
            } else {
                map.insert((*last).to_owned(), value);
            }
        }
    }
    contact
}

/// The contact just before the first of `pending`: their attribute changes undone (latest
/// first) and their counts taken off `stats`.
fn rewind(current: &Value, pending: &[Pending]) -> Value {
    let mut contact = current.clone();
    for event in pending.iter().rev() {
        if event.kind == "contact.updated" {
            contact = contact_as_of(&contact, event, "old");
        }
        let count = contact["stats"][event.kind.as_str()].as_i64().unwrap_or(0);
        if let Some(stats) = contact.get_mut("stats").and_then(Value::as_object_mut) {
            if count > 1 {
                stats.insert(event.kind.clone(), json!(count - 1));
            } else {
                stats.remove(&event.kind);
            }
        }
    }
    contact
}

/// One event against the contact's running journeys (exit_on, wait_for, held sends) and the
/// running campaigns' triggers.
async fn consume(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    journeys: &mut Vec<Journey>,
    event: &Pending,
    as_of: &mut Value,
) -> EngineResult<()> {
    let now = scope.now;
    let previous = as_of.clone();
    if event.kind == "contact.updated" {
        *as_of = contact_as_of(as_of, event, "new");
    }
    // Its own type's count is the event's ordinal.
    as_of["stats"][event.kind.as_str()] = json!(event.ordinal);
    let contact = facts::contact(as_of);
    let ev = facts::event(
        &event.kind,
        &event.properties,
        event.occurred_at,
        event.ordinal,
        &event.source,
    );
    let bound = facts::Facts::new(&contact, &ev, now);

    // A `message.*` event belongs to the journey that queued the message.
    let message_journey: Option<Uuid> = match (event.kind.starts_with("message."), event.subject_id)
    {
        (true, Some(message)) if !journeys.is_empty() => {
            sqlx::query_scalar("SELECT journey_id FROM messages WHERE tenant_id = $1 AND id = $2")
                .bind(scope.tenant.id)
                .bind(message)
                .fetch_optional(&mut *conn)
                .await?
                .flatten()
        }
        _ => None,
    };
    for j in journeys.iter_mut().filter(|j| j.status == "active") {
        let def = scope
            .state
            .campaigns
            .get(conn, scope.tenant.id, j.campaign_id, j.version)
            .await?;
        let goal = def
            .exit_on
            .iter()
            .find(|x| x.event.0 == event.kind && x.filter.as_ref().is_none_or(|f| bound.holds(f)));
        if goal.is_some() {
            finish(scope, j, "exited", &format!("exit_on:{}", event.kind), true)?;
            continue;
        }
        if let Some(Step::WaitFor {
            event: wanted,
            filter,
            ..
        }) = def.step_at(&j.position)
            && j.wait_until.is_some()
            && wanted.0 == event.kind
            && (!event.kind.starts_with("message.") || message_journey == Some(j.id))
            && filter.as_ref().is_none_or(|f| bound.holds(f))
        {
            log_step(
                scope,
                j,
                "wait_for",
                json!({"outcome": "event", "event_id": event.id, "event": event.kind}),
            )?;
            j.position = def.next(&j.position);
            j.wait_until = None;
            j.wake_at = Some(now);
            j.dirty = true;
            continue;
        }
        if j.held_since.is_some()
            && matches!(event.kind.as_str(), "ticket.solved" | "ticket.closed")
        {
            j.wake_at = Some(now);
            j.dirty = true;
        }
    }

    let mut running: Vec<(Uuid, i32)> = scope
        .campaigns
        .iter()
        .filter(|(_, c)| c.0 == "active")
        .map(|(id, c)| (*id, c.1))
        .collect();
    running.sort();
    for (campaign, version) in running {
        let def = scope
            .state
            .campaigns
            .get(conn, scope.tenant.id, campaign, version)
            .await?;
        let t = &def.trigger;
        let fires = if let Some(kind) = &t.event {
            kind.0 == event.kind && t.filter.as_ref().is_none_or(|f| bound.holds(f))
        } else if let Some(condition) = &t.condition {
            match event.kind.as_str() {
                "contact.created" => bound.holds(condition),
                "contact.updated" => {
                    let before = facts::contact(&previous);
                    bound.holds(condition) && !facts::holds(condition, &before, &ev, now)
                }
                _ => false,
            }
        } else {
            false
        };
        if !fires {
            continue;
        }
        if let Some(audience) = &def.audience
            && !bound.holds(audience)
        {
            continue;
        }
        let trigger = json!({"id": event.id, "type": event.kind, "properties": event.properties,
                             "occurred_at": event.occurred_at, "ordinal": event.ordinal});
        let key = match def.reentry {
            Reentry::Once => "once".to_owned(),
            Reentry::Always | Reentry::After(_) => event.id.to_string(),
        };
        enrol(
            conn,
            scope,
            journeys,
            campaign,
            version,
            &key,
            Some(event.id),
            trigger,
        )
        .await?;
    }
    Ok(())
}

/// Starts a journey unless the contact is already in this campaign or the reentry policy
/// forbids it. The unique indexes make a double enrolment impossible even across processes.
#[expect(clippy::too_many_arguments, reason = "one journey's starting facts")]
async fn enrol(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    journeys: &mut Vec<Journey>,
    campaign: Uuid,
    version: i32,
    key: &str,
    trigger_event_id: Option<Uuid>,
    trigger: Value,
) -> EngineResult<()> {
    if let Some(previous) = journeys
        .iter_mut()
        .find(|j| j.campaign_id == campaign && j.status == "active")
    {
        // A previous journey that is due (its last wait is over) runs first: it may end now,
        // and then this event may start the next one.
        let due = previous.wake_at.is_some_and(|w| w <= scope.now);
        if due {
            advance(conn, scope, previous).await?;
        }
        if previous.status == "active" {
            return Ok(());
        }
    }
    let def = scope
        .state
        .campaigns
        .get(conn, scope.tenant.id, campaign, version)
        .await?;
    if let Reentry::After(span) = def.reentry
        && scope
            .last_enrolled(campaign)
            .is_some_and(|l| l + span.as_chrono() > scope.now)
    {
        return Ok(());
    }
    let id = Uuid::now_v7();
    // An enrolment keyed by its trigger event cannot have been made before (the event is
    // consumed once): the journey is inserted with the others at the commit. A once-only or
    // scheduled enrolment asks the unique index now.
    if trigger_event_id.is_some() && def.reentry != Reentry::Once {
        metrics::counter!("campaign_enrolments_total").increment(1);
        scope.enrolled(campaign);
        scope.emit(
            "campaign.enrolled",
            json!({"campaign_id": campaign, "campaign": campaign_name(scope, campaign),
                   "journey_id": id, "version": version,
                   "trigger_event_id": trigger_event_id}),
            id,
        );
        journeys.push(Journey {
            id,
            campaign_id: campaign,
            version,
            contact_id: scope.contact.id,
            status: "active".to_owned(),
            position: vec![0],
            wake_at: Some(scope.now),
            wait_until: None,
            held_since: None,
            trigger_event: trigger,
            last_message_id: None,
            exit_reason: None,
            converted: false,
            dirty: true,
            new: Some(Enrolment {
                key: key.to_owned(),
                trigger_event_id,
                enrolled_at: scope.now,
            }),
        });
        return Ok(());
    }
    // The previous journey's end must be stored before the next one can take its place.
    if let Some(previous) = journeys
        .iter_mut()
        .find(|j| j.campaign_id == campaign && j.dirty && j.new.is_none())
    {
        save_journeys(
            conn,
            scope.tenant.id,
            std::slice::from_ref(previous),
            scope.now,
        )
        .await?;
        previous.dirty = false;
    }
    let sql = format!(
        "INSERT INTO journeys (tenant_id, id, campaign_id, version, contact_id, status, position,
            wake_at, enrol_key, trigger_event_id, trigger_event, enrolled_at)
         VALUES ($1, $2, $3, $4, $5, 'active', '{{0}}', $6, $7, $8, $9, $6)
         ON CONFLICT DO NOTHING
         RETURNING {JOURNEY_COLUMNS}"
    );
    let inserted: Option<Journey> = sqlx::query_as(&sql)
        .bind(scope.tenant.id)
        .bind(id)
        .bind(campaign)
        .bind(version)
        .bind(scope.contact.id)
        .bind(scope.now)
        .bind(key)
        .bind(trigger_event_id)
        .bind(&trigger)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(journey) = inserted else {
        return Ok(());
    };
    metrics::counter!("campaign_enrolments_total").increment(1);
    scope.enrolled(campaign);
    scope.emit(
        "campaign.enrolled",
        json!({"campaign_id": campaign, "campaign": campaign_name(scope, campaign),
               "journey_id": journey.id, "version": version,
               "trigger_event_id": trigger_event_id}),
        journey.id,
    );
    journeys.push(journey);
    Ok(())
}

fn campaign_name(scope: &Scope<'_>, campaign: Uuid) -> String {
    scope
        .campaigns
        .get(&campaign)
        .map(|c| c.2.clone())
        .unwrap_or_default()
}

/// Puts a journey decision on the contact's timeline.
fn log_step(scope: &Scope<'_>, j: &Journey, step: &str, details: Value) -> EngineResult<()> {
    let mut properties = json!({"campaign_id": j.campaign_id,
        "campaign": campaign_name(scope, j.campaign_id), "journey_id": j.id,
        "version": j.version, "step": step, "position": j.position});
    if let (Some(p), Value::Object(d)) = (properties.as_object_mut(), details) {
        p.extend(d);
    }
    scope.emit("campaign.step", properties, j.id);
    Ok(())
}

/// Ends a journey: `completed` after its last step, `exited` otherwise.
fn finish(
    scope: &Scope<'_>,
    j: &mut Journey,
    status: &str,
    reason: &str,
    converted: bool,
) -> EngineResult<()> {
    j.status = status.to_owned();
    j.exit_reason = (status == "exited").then(|| reason.to_owned());
    j.converted = converted;
    j.wake_at = None;
    j.dirty = true;
    let kind = if status == "completed" {
        "campaign.completed"
    } else {
        "campaign.exited"
    };
    scope.emit(
        kind,
        json!({"campaign_id": j.campaign_id, "campaign": campaign_name(scope, j.campaign_id),
               "journey_id": j.id, "version": j.version, "reason": reason,
               "converted": converted}),
        j.id,
    );
    metrics::counter!("campaign_journeys_ended_total", "status" => status.to_owned()).increment(1);
    Ok(())
}

/// Writes journeys as they now stand: an UPDATE of those read from the database, then an
/// INSERT of those enrolled since (in that order, so a journey that ended makes room for the
/// next one of its campaign), one statement each.
async fn save_journeys(
    conn: &mut PgConnection,
    tenant: TenantId,
    journeys: &[Journey],
    now: DateTime<Utc>,
) -> EngineResult<()> {
    let (new, read): (Vec<&Journey>, Vec<&Journey>) = journeys
        .iter()
        .filter(|j| j.dirty)
        .partition(|j| j.new.is_some());
    let position = |j: &Journey| {
        let items: Vec<String> = j.position.iter().map(i32::to_string).collect();
        format!("{{{}}}", items.join(","))
    };
    if !read.is_empty() {
        sqlx::query(
            "UPDATE journeys j SET status = u.status, position = u.position::int4[],
                wake_at = u.wake_at, wait_until = u.wait_until, held_since = u.held_since,
                last_message_id = u.last_message_id, exit_reason = u.exit_reason,
                converted = u.converted,
                ended_at = CASE WHEN u.status = 'active' THEN NULL
                                ELSE coalesce(j.ended_at, $2) END,
                trigger_event = CASE WHEN u.status = 'active' THEN j.trigger_event
                                     ELSE '{}' END,
                updated_at = now()
             FROM unnest($3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
                         $7::timestamptz[], $8::timestamptz[], $9::uuid[], $10::text[],
                         $11::bool[])
                  AS u(id, status, position, wake_at, wait_until, held_since, last_message_id,
                       exit_reason, converted)
             WHERE j.tenant_id = $1 AND j.id = u.id",
        )
        .bind(tenant)
        .bind(now)
        .bind(read.iter().map(|j| j.id).collect::<Vec<_>>())
        .bind(read.iter().map(|j| j.status.as_str()).collect::<Vec<_>>())
        .bind(read.iter().map(|j| position(j)).collect::<Vec<_>>())
        .bind(read.iter().map(|j| j.wake_at).collect::<Vec<_>>())
        .bind(read.iter().map(|j| j.wait_until).collect::<Vec<_>>())
        .bind(read.iter().map(|j| j.held_since).collect::<Vec<_>>())
        .bind(read.iter().map(|j| j.last_message_id).collect::<Vec<_>>())
        .bind(
            read.iter()
                .map(|j| j.exit_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(read.iter().map(|j| j.converted).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    if !new.is_empty() {
        let enrolment = |j: &&Journey| {
            j.new.clone().unwrap_or(Enrolment {
                key: j.id.to_string(),
                trigger_event_id: None,
                enrolled_at: now,
            })
        };
        let enrolments: Vec<Enrolment> = new.iter().map(enrolment).collect();
        // Only the later steps of a running journey read its copy of the trigger event; one
        // that ended where it started keeps none (`trigger_event_id` names the event), as
        // the update above drops it when a journey ends.
        let ended = Value::Object(Default::default());
        sqlx::query(
            "INSERT INTO journeys (tenant_id, id, campaign_id, version, contact_id, status,
                 position, wake_at, wait_until, held_since, enrol_key, trigger_event_id,
                 trigger_event, last_message_id, enrolled_at, ended_at, exit_reason, converted)
             SELECT $1, u.id, u.campaign_id, u.version, u.contact_id, u.status,
                    u.position::int4[], u.wake_at, u.wait_until, u.held_since, u.enrol_key,
                    u.trigger_event_id, u.trigger_event, u.last_message_id, u.enrolled_at,
                    CASE WHEN u.status = 'active' THEN NULL ELSE $2 END, u.exit_reason,
                    u.converted
             FROM unnest($3::uuid[], $4::uuid[], $5::int4[], $6::uuid[], $7::text[], $8::text[],
                         $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::text[],
                         $13::uuid[], $14::jsonb[], $15::uuid[], $16::timestamptz[], $17::text[],
                         $18::bool[])
                  WITH ORDINALITY AS u(id, campaign_id, version, contact_id, status, position,
                       wake_at, wait_until, held_since, enrol_key, trigger_event_id,
                       trigger_event, last_message_id, enrolled_at, exit_reason, converted, n)
             ORDER BY u.n",
        )
        .bind(tenant)
        .bind(now)
        .bind(new.iter().map(|j| j.id).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.campaign_id).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.version).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.contact_id).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.status.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|j| position(j)).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.wake_at).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.wait_until).collect::<Vec<_>>())
        .bind(new.iter().map(|j| j.held_since).collect::<Vec<_>>())
        .bind(
            enrolments
                .iter()
                .map(|e| e.key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            enrolments
                .iter()
                .map(|e| e.trigger_event_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            new.iter()
                .map(|j| match j.status.as_str() {
                    "active" => &j.trigger_event,
                    _ => &ended,
                })
                .collect::<Vec<_>>(),
        )
        .bind(new.iter().map(|j| j.last_message_id).collect::<Vec<_>>())
        .bind(enrolments.iter().map(|e| e.enrolled_at).collect::<Vec<_>>())
        .bind(
            new.iter()
                .map(|j| j.exit_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(new.iter().map(|j| j.converted).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// What a send step decided.
enum SendOutcome {
    /// Queued or recorded as suppressed: go on.
    Done,
    /// Not now (quiet hours, an open ticket): look again at this time.
    Later(DateTime<Utc>),
    /// The step could not send and ended the journey (a missing template, one that does not
    /// render): go no further.
    Ended,
}

/// Runs a journey's steps until it has to wait or ends.
async fn advance(conn: &mut PgConnection, scope: &Scope<'_>, j: &mut Journey) -> EngineResult<()> {
    let now = scope.now;
    let def = scope
        .state
        .campaigns
        .get(conn, scope.tenant.id, j.campaign_id, j.version)
        .await?;
    j.dirty = true;
    // Positions only move forward through a finite list, so this ends; the bound is a guard.
    for _ in 0..1_000 {
        let Some(step) = def.step_at(&j.position) else {
            return finish(scope, j, "completed", "completed", false);
        };
        match step {
            Step::Wait { duration } => match timer(j, duration.as_chrono(), now) {
                Timer::Started(until) => {
                    log_step(scope, j, "wait", json!({"until": until}))?;
                    return Ok(());
                }
                Timer::Running => return Ok(()),
                Timer::Over => j.position = def.next(&j.position),
            },
            Step::WaitFor {
                event,
                timeout,
                on_timeout,
                ..
            } => {
                let span = timeout.map(|t| t.as_chrono()).unwrap_or_default();
                match timer(j, span, now) {
                    Timer::Started(until) => {
                        let details = json!({"event": event.0, "until": until});
                        log_step(scope, j, "wait_for", details)?;
                        return Ok(());
                    }
                    Timer::Running => return Ok(()),
                    Timer::Over => {
                        let details = json!({"outcome": "timeout", "event": event.0});
                        log_step(scope, j, "wait_for", details)?;
                        if on_timeout.is_empty() {
                            j.position = def.next(&j.position);
                        } else {
                            j.position.push(0);
                        }
                    }
                }
            }
            Step::Send {
                template,
                channels,
                variables,
            } => match send(conn, scope, &def, j, template, channels, variables).await? {
                SendOutcome::Done => {
                    j.held_since = None;
                    j.position = def.next(&j.position);
                }
                SendOutcome::Later(at) => {
                    j.wake_at = Some(at);
                    return Ok(());
                }
                SendOutcome::Ended => return Ok(()),
            },
            Step::NotifyAgent {
                agent,
                create_ticket,
                subject,
                note,
                priority,
            } => {
                notify_agent(
                    conn,
                    scope,
                    &def,
                    j,
                    *agent,
                    *create_ticket,
                    subject.as_deref(),
                    note.as_deref(),
                    priority.map(|p| p.as_str()).unwrap_or("high"),
                )
                .await?;
                j.position = def.next(&j.position);
            }
            Step::Exit => {
                return finish(scope, j, "exited", "exit_step", false);
            }
        }
    }
    finish(scope, j, "exited", "too_many_steps", false)
}

/// Where a journey's current wait stands.
enum Timer {
    /// The journey just reached the wait, which ends then.
    Started(DateTime<Utc>),
    /// Still waiting.
    Running,
    /// The wait is over.
    Over,
}

/// Starts, checks or ends the current step's wait of `span`, setting when to wake.
fn timer(j: &mut Journey, span: chrono::Duration, now: DateTime<Utc>) -> Timer {
    match j.wait_until {
        None => {
            let until = now + span;
            j.wait_until = Some(until);
            j.wake_at = Some(until);
            Timer::Started(until)
        }
        Some(until) if until > now => {
            j.wake_at = Some(until);
            Timer::Running
        }
        Some(_) => {
            j.wait_until = None;
            Timer::Over
        }
    }
}

/// The contact's time zone, else the tenant's.
fn zone(scope: &Scope<'_>) -> chrono_tz::Tz {
    scope
        .contact
        .timezone
        .as_deref()
        .and_then(|z| z.parse().ok())
        .or_else(|| scope.tenant.timezone.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

/// When quiet hours that cover `now` end, or None outside quiet hours.
pub fn quiet_until(q: &QuietHours, tz: chrono_tz::Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz);
    let t = local.time();
    let (start, end) = (q.start.0, q.end.0);
    let inside = if start < end {
        t >= start && t < end
    } else {
        t >= start || t < end
    };
    if !inside {
        return None;
    }
    let mut day = local.date_naive();
    if t >= end {
        day = day.succ_opt()?;
    }
    let naive = day.and_time(end);
    let resolved = tz
        .from_local_datetime(&naive)
        .earliest()
        // The end falls in a DST gap: an hour later exists.
        .or_else(|| {
            tz.from_local_datetime(&(naive + chrono::Duration::hours(1)))
                .earliest()
        })?;
    Some(resolved.with_timezone(&Utc))
}

/// A send step: held while a ticket is open, deferred through quiet hours, dropped by the
/// frequency cap, otherwise queued through the outbox like any message.
async fn send(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    def: &Definition,
    j: &mut Journey,
    template: &str,
    channels: &[Channel],
    variables: &serde_json::Map<String, Value>,
) -> EngineResult<SendOutcome> {
    let now = scope.now;
    let Some(found) = templates::get(conn, scope.tenant.id, template).await? else {
        finish(
            scope,
            j,
            "exited",
            &format!("template_missing:{template}"),
            false,
        )?;
        return Ok(SendOutcome::Ended);
    };
    let marketing = found.purpose == Purpose::Marketing;
    let mut suppress: Option<&str> = None;
    if marketing && def.suppress_while_ticket_open {
        let open: i64 = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM tickets WHERE tenant_id = $1 AND contact_id = $2
               AND status IN ",
            open_ticket_statuses!(),
        ))
        .bind(scope.tenant.id)
        .bind(scope.contact.id)
        .fetch_one(&mut *conn)
        .await?;
        if open > 0 {
            let since = match j.held_since {
                Some(since) => since,
                None => {
                    j.held_since = Some(now);
                    log_step(
                        scope,
                        j,
                        "send",
                        json!({"outcome": "held", "reason": "ticket_open",
                        "template": template, "until": now + def.hold_limit()}),
                    )?;
                    now
                }
            };
            let deadline = since + def.hold_limit();
            if now < deadline {
                return Ok(SendOutcome::Later((now + HOLD_RECHECK).min(deadline)));
            }
            suppress = Some("ticket_open");
        }
    }
    if suppress.is_none()
        && let Some(q) = &def.quiet_hours
        && let Some(until) = quiet_until(q, zone(scope), now)
    {
        log_step(
            scope,
            j,
            "send",
            json!({"outcome": "deferred", "reason": "quiet_hours",
            "template": template, "until": until}),
        )?;
        return Ok(SendOutcome::Later(until));
    }
    if suppress.is_none()
        && marketing
        && let Some(cap) = &def.frequency_cap
    {
        let recent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM marketing_sends
             WHERE tenant_id = $1 AND contact_id = $2 AND sent_at > $3 AND sent_at <= $4",
        )
        .bind(scope.tenant.id)
        .bind(scope.contact.id)
        .bind(now - cap.per.as_chrono())
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        if recent >= i64::from(cap.max) {
            suppress = Some("frequency_cap");
        }
    }
    let mut vars = Value::Object(variables.clone());
    vars["campaign"] = json!({"id": j.campaign_id, "name": campaign_name(scope, j.campaign_id)});
    let compose = Compose {
        contact_id: scope.contact.id,
        template_key: template,
        channels,
        vars,
        event: Some(j.trigger_event.clone()),
        journey: Some((j.campaign_id, j.id)),
        suppress,
    };
    let message = match messages::enqueue(conn, scope.tenant, compose, scope.opts).await {
        Ok(m) => m,
        // The template no longer renders for this contact: the journey cannot go on.
        Err(e) if e.is_permanent() => {
            let reason = format!("send_failed: {e}");
            finish(scope, j, "exited", &reason, false)?;
            return Ok(SendOutcome::Ended);
        }
        Err(e) => return Err(e.into()),
    };
    if message.status == "queued" && marketing {
        sqlx::query(
            "INSERT INTO marketing_sends (tenant_id, contact_id, sent_at, message_id, campaign_id)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(scope.tenant.id)
        .bind(scope.contact.id)
        .bind(now)
        .bind(message.id)
        .bind(j.campaign_id)
        .execute(&mut *conn)
        .await?;
    }
    j.last_message_id = Some(message.id);
    log_step(
        scope,
        j,
        "send",
        json!({"outcome": message.status, "reason": message.status_reason,
        "template": template, "message_id": message.id, "channel": message.channel}),
    )?;
    Ok(SendOutcome::Done)
}

/// Hands the contact to a person: a ticket for the owner (or the next agent in the round
/// robin) to call the customer, and an email to that agent.
#[expect(clippy::too_many_arguments, reason = "the step's fields")]
async fn notify_agent(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    def: &Definition,
    j: &mut Journey,
    choice: AgentChoice,
    create_ticket: bool,
    subject: Option<&str>,
    note: Option<&str>,
    priority: &str,
) -> EngineResult<()> {
    let contact = &scope.contact;
    let owner: Option<Uuid> = match (choice, contact.owner_agent_id) {
        (AgentChoice::Owner, Some(owner)) => {
            sqlx::query_scalar("SELECT id FROM agents WHERE tenant_id = $1 AND id = $2 AND active")
                .bind(scope.tenant.id)
                .bind(owner)
                .fetch_optional(&mut *conn)
                .await?
        }
        _ => None,
    };
    let who = [contact.first_name.as_deref(), contact.last_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let who = if who.is_empty() {
        contact
            .external_id
            .clone()
            .or_else(|| contact.phone.clone())
            .unwrap_or_else(|| contact.id.to_string())
    } else {
        who
    };
    let subject = subject
        .map(str::to_owned)
        .unwrap_or_else(|| format!("Call {who} ({})", def.name));
    let trigger_kind = j.trigger_event["type"].as_str().unwrap_or("schedule");
    let body = match note {
        Some(n) => n.to_owned(),
        None => format!(
            "Campaign \"{}\" hands {who} to you after `{trigger_kind}`. Phone: {}.",
            def.name,
            contact.phone.as_deref().unwrap_or("none on file"),
        ),
    };
    let (ticket, agent) = if create_ticket {
        let row = support::NewTicketRow {
            contact_id: contact.id,
            channel: "phone",
            subject: &subject,
            body: &body,
            category: Some("campaign"),
            priority,
            assignee: owner,
        };
        let ticket = support::create_ticket(conn, scope.tenant, &row).await?;
        (Some(ticket.id), ticket.assignee_id)
    } else if owner.is_some() {
        (None, owner)
    } else {
        let any: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM agents WHERE tenant_id = $1 AND active
             ORDER BY last_assigned_at NULLS FIRST, id LIMIT 1",
        )
        .bind(scope.tenant.id)
        .fetch_optional(&mut *conn)
        .await?;
        (None, any)
    };
    if let Some(agent) = agent {
        messages::enqueue_to_agent(
            conn,
            scope.tenant.id,
            agent,
            scope.contact.id,
            &subject,
            &body,
            scope.opts.max_attempts,
        )
        .await?;
    }
    log_step(
        scope,
        j,
        "notify_agent",
        json!({"ticket_id": ticket, "agent_id": agent,
        "outcome": if agent.is_some() { "notified" } else { "unassigned" }}),
    )
}

/// Enrols the contacts whose date comes round: for each active campaign with a schedule, the
/// contacts whose birthday is today in their time zone and whose local time has passed `at`,
/// once a year. 29 February birthdays are kept on 28 February in other years.
async fn run_schedules(state: &AppState, now: DateTime<Utc>) -> EngineResult<usize> {
    let running: Vec<(TenantId, Uuid, i32)> =
        sqlx::query_as("SELECT tenant_id, id, version FROM campaigns WHERE status = 'active'")
            .fetch_all(&state.pool)
            .await?;
    let mut enrolled = 0;
    for (tenant, campaign, version) in running {
        let mut conn = state.pool.acquire().await?;
        let def = state
            .campaigns
            .get(&mut conn, tenant, campaign, version)
            .await?;
        let Some(Schedule::Birthday) = def.trigger.schedule else {
            continue;
        };
        let at = def
            .trigger
            .at
            .map(|a| a.0)
            .unwrap_or_else(|| chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default());
        let due: Vec<(Uuid, i32)> = sqlx::query_as(
            "SELECT c.id, extract(year FROM l.local)::int
             FROM contacts c JOIN tenants t ON t.id = c.tenant_id
             CROSS JOIN LATERAL (SELECT ($3::timestamptz AT TIME ZONE
                 coalesce(c.timezone, t.timezone)) AS local) l
             WHERE c.tenant_id = $1 AND c.birthday IS NOT NULL AND c.erased_at IS NULL
               AND l.local::time >= $4
               AND (to_char(c.birthday, 'MM-DD') = to_char(l.local, 'MM-DD')
                    OR (to_char(c.birthday, 'MM-DD') = '02-29' AND to_char(l.local, 'MM-DD') = '02-28'
                        AND extract(day FROM (date_trunc('year', l.local) + interval '1 month 28 days')) <> 29))
               AND NOT EXISTS (SELECT 1 FROM schedule_marks m WHERE m.tenant_id = c.tenant_id
                    AND m.campaign_id = $2 AND m.contact_id = c.id
                    AND m.occurrence = 'birthday:' || extract(year FROM l.local)::int)
             LIMIT 1000",
        )
        .bind(tenant)
        .bind(campaign)
        .bind(now)
        .bind(at)
        .fetch_all(&mut *conn)
        .await?;
        drop(conn);
        for (contact, year) in due {
            let key = format!("birthday:{year}");
            if process_contact_logged(state, tenant, contact, &[(campaign, version, key)])
                .await
                .is_some()
            {
                enrolled += 1;
            }
        }
    }
    Ok(enrolled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaigns::model::LocalTime;
    use chrono::NaiveTime;

    fn hours(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: LocalTime(NaiveTime::parse_from_str(start, "%H:%M").unwrap()),
            end: LocalTime(NaiveTime::parse_from_str(end, "%H:%M").unwrap()),
        }
    }

    #[test]
    fn overnight_quiet_hours_end_the_next_morning_local_time() {
        let tz: chrono_tz::Tz = "Europe/Zagreb".parse().unwrap();
        let q = hours("21:00", "08:00");
        // 22:30 in Zagreb (UTC+1 in November).
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 21, 30, 0).unwrap();
        assert_eq!(
            quiet_until(&q, tz, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 7, 0, 0).unwrap())
        );
        // 03:00 local: the same morning.
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 2, 0, 0).unwrap();
        assert_eq!(
            quiet_until(&q, tz, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 7, 0, 0).unwrap())
        );
        // Noon: not quiet.
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 11, 0, 0).unwrap();
        assert_eq!(quiet_until(&q, tz, now), None);
    }

    #[test]
    fn daytime_quiet_hours() {
        let q = hours("12:00", "14:00");
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 13, 0, 0).unwrap();
        assert_eq!(
            quiet_until(&q, chrono_tz::UTC, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 14, 0, 0).unwrap())
        );
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 14, 0, 0).unwrap();
        assert_eq!(quiet_until(&q, chrono_tz::UTC, now), None);
    }

    #[test]
    fn contact_as_of_applies_old_or_new_values() {
        let current = json!({"attributes": {"a": 3.0, "b": 1.0}, "email": "x@example.com"});
        let event = Pending {
            seq: 1,
            id: Uuid::nil(),
            kind: "contact.updated".into(),
            properties: json!({"changes": {"attributes.a": {"old": 1.0, "new": 2.0},
                                           "attributes.c": {"old": null, "new": 5.0}}}),
            occurred_at: Utc::now(),
            ordinal: 1,
            source: "rapport".into(),
            subject_id: None,
        };
        let old = contact_as_of(&current, &event, "old");
        assert_eq!(old["attributes"], json!({"a": 1.0, "b": 1.0}));
        let new = contact_as_of(&current, &event, "new");
        assert_eq!(new["attributes"], json!({"a": 2.0, "b": 1.0, "c": 5.0}));
    }
}
