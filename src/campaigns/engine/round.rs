//! A round: which contacts have work, in chunks of one transaction each, and the batched
//! loads and writes of a chunk.

use super::*;

/// One round: contacts with new events, contacts with due journeys, and (when asked) the
/// schedules. Returns what it did; zero everywhere means there was nothing to do.
///
/// Contacts are evaluated by tenant in chunks, each in one transaction with a fixed number of
/// statements for its loads and its writes; a chunk that fails is evaluated again contact by
/// contact, so one contact's failure is only its own. A chunk holds up to
/// [`CONTACTS_PER_TX`] contacts and, as far as the round's view of the inbox tells,
/// [`EVENTS_PER_TX`] events: many contacts with an event each while evaluation keeps up,
/// few contacts with many events each during a backlog of theirs (a contact read and locked
/// whose events do not fit in its transaction's [`EVENTS_PER_TX`] would be work for nothing).
pub async fn round(state: &AppState, schedules: bool) -> EngineResult<Round> {
    let now = state.clock.now();
    let mut done = Round::default();
    // The oldest events first (the inbox's order index), then the journeys due first.
    let mut conn = state.pool.acquire().await?;
    let pending = store::journeys::waiting(&mut conn, MAX_FAILURES, ROUND_SIZE).await?;
    let due = store::journeys::due(&mut conn, now, ROUND_SIZE).await?;
    drop(conn);
    let mut seen = std::collections::HashSet::with_capacity(pending.len() + due.len());
    // With each contact, how many of the round's events are its (a due journey counts one).
    let mut contacts: Vec<(TenantId, Uuid, i64)> = pending
        .into_iter()
        .chain(
            due.into_iter()
                .map(|(tenant, contact)| (tenant, contact, 1)),
        )
        .filter(|c| seen.insert((c.0, c.1)))
        .collect();
    contacts.sort_by_key(|c| c.0.0);
    let mut chunks: Vec<(TenantId, Vec<Uuid>, i64)> = Vec::new();
    for (tenant, contact, events) in contacts {
        match chunks.last_mut() {
            Some((t, ids, n))
                if *t == tenant && ids.len() < CONTACTS_PER_TX && *n + events <= EVENTS_PER_TX =>
            {
                ids.push(contact);
                *n += events;
            }
            _ => chunks.push((tenant, vec![contact], events)),
        }
    }
    let results: Vec<Processed> = futures::stream::iter(chunks)
        .map(|(tenant, ids, _)| process_chunk(state, tenant, ids))
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

/// When the next journey is due, for an idle engine about to sleep (`None`: none waits).
pub async fn next_wake(state: &AppState) -> EngineResult<Option<DateTime<Utc>>> {
    Ok(store::journeys::next_wake(&state.pool, state.clock.now()).await?)
}

/// What evaluating contacts did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Processed {
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
pub(super) async fn process_chunk(
    state: &AppState,
    tenant: TenantId,
    contacts: Vec<Uuid>,
) -> Processed {
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

pub(super) async fn process_contact_logged(
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
            let now = state.clock.now();
            let set_aside = store::journeys::set_aside(&state.pool, tenant, contact, now).await;
            if let Err(e) = set_aside {
                tracing::warn!(error = %e, "cannot set the failed evaluation aside");
            }
            None
        }
    }
}

/// Consumes the pending events and runs the due journeys of some of a tenant's contacts, in
/// one transaction under each contact's advisory lock; `scheduled` enrolments are looked at
/// too. Contacts another worker holds are skipped (they are being done). Loads and writes are
/// one statement each for all the contacts; only steps that send, hand over to an agent or
/// enrol once-only take statements of their own.
pub(super) async fn process_contacts(
    state: &AppState,
    tenant_id: TenantId,
    batch: &[(Uuid, &[Scheduled])],
) -> EngineResult<Processed> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let keys: Vec<i64> = batch
        .iter()
        .map(|(c, _)| contact_lock_key(tenant_id, *c))
        .collect();
    let locked: std::collections::HashSet<i64> = crate::db::try_advisory_xact_locks(&mut tx, &keys)
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
    let rows =
        store::journeys::pending_of(&mut tx, tenant_id, &ids, MAX_FAILURES, EVENTS_PER_TX).await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.event.seq).collect();
    let mut pending: HashMap<Uuid, Vec<Pending>> = HashMap::new();
    for r in rows {
        pending.entry(r.contact_id).or_default().push(r.event);
    }
    let tenant = crate::tenants::store::context(&mut tx, tenant_id)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("tenant {tenant_id} is missing")))?;
    let campaigns: HashMap<Uuid, RunningCampaign> = store::running(&mut tx, tenant_id)
        .await?
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let mut journeys: HashMap<Uuid, Vec<Journey>> = HashMap::new();
    for j in store::journeys::lock_active(&mut tx, tenant_id, &ids).await? {
        journeys.entry(j.contact_id).or_default().push(j);
    }
    let segments = Mutex::new(HashMap::new());
    let stats = stats_read(
        &mut tx, state, tenant_id, &campaigns, &journeys, &batch, &segments,
    )
    .await?;
    let mut found: HashMap<Uuid, Contact> = contacts::read_many(&mut tx, tenant_id, &ids, stats)
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
        let opts = state.send_options().await?;
        // When each contact last enrolled in the active campaigns (the only ones that enrol)
        // that re-enrol only after a while: one look-up for the chunk, not one per enrolment.
        let mut timed = Vec::new();
        for (id, c) in campaigns
            .iter()
            .filter(|(_, c)| c.status == CampaignStatus::Active)
        {
            let def = state
                .campaigns
                .get(&mut tx, tenant_id, *id, c.version)
                .await?;
            if matches!(def.reentry, Reentry::After(_)) {
                timed.push(*id);
            }
        }
        let mut last_enrolled: HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>> = HashMap::new();
        if !timed.is_empty() {
            for (contact, campaign, at) in
                store::journeys::last_enrolled(&mut tx, tenant_id, &timed, &ids).await?
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
                segments: &segments,
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
        store::journeys::save(&mut tx, tenant_id, &touched, now).await?;
        events::append_many(&mut tx, &emitted).await?;
    }
    if !seqs.is_empty() {
        store::journeys::consumed(&mut tx, tenant_id, &seqs).await?;
    }
    tx.commit().await?;
    if !seqs.is_empty() {
        metrics::counter!("campaign_events_consumed_total").increment(seqs.len() as u64);
    }
    Ok(done)
}

/// Whether this chunk reads its contacts' `stats` and `last_event_at`: only conditions read
/// them here (a message reads its contact itself), so they are gathered (two look-ups in the
/// counters per contact, most of the cost of reading a contact) only when a condition that
/// may run for these contacts reads them: those of the active campaigns (which enrol), of the
/// versions the contacts' journeys follow (their goals and waits), of the scheduled
/// enrolments, and of the segments their audiences name.
async fn stats_read(
    conn: &mut PgConnection,
    state: &AppState,
    tenant: TenantId,
    campaigns: &HashMap<Uuid, RunningCampaign>,
    journeys: &HashMap<Uuid, Vec<Journey>>,
    batch: &[&(Uuid, &[Scheduled])],
    segments: &Mutex<HashMap<Uuid, Option<Condition>>>,
) -> EngineResult<contacts::Stats> {
    let mut versions: std::collections::BTreeSet<(Uuid, i32)> = campaigns
        .iter()
        .filter(|(_, c)| c.status == CampaignStatus::Active)
        .map(|(id, c)| (*id, c.version))
        .collect();
    versions.extend(
        journeys
            .values()
            .flatten()
            .map(|j| (j.campaign_id, j.version)),
    );
    versions.extend(
        batch
            .iter()
            .flat_map(|(_, scheduled)| scheduled.iter().map(|(c, v, _)| (*c, *v))),
    );
    for (campaign, version) in versions {
        let def = state.campaigns.get(conn, tenant, campaign, version).await?;
        if def.conditions().iter().any(|c| c.reads_stats()) {
            return Ok(contacts::Stats::Read);
        }
        if let Some(segment) = def.audience.as_ref().and_then(Audience::segment)
            && segment_condition(conn, tenant, segments, segment)
                .await?
                .is_some_and(|c| c.reads_stats())
        {
            return Ok(contacts::Stats::Read);
        }
    }
    Ok(contacts::Stats::Skipped)
}

/// The advisory lock that serialises everything the engine does for one contact.
pub(super) fn contact_lock_key(tenant: TenantId, contact: Uuid) -> i64 {
    let t = tenant.0.as_u64_pair();
    let c = contact.as_u64_pair();
    (t.0 ^ t.1 ^ c.0.rotate_left(17) ^ c.1) as i64
}

/// Erased contacts' journeys end (their pending events are dropped with the others').
pub(super) async fn forget_contacts(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
    now: DateTime<Utc>,
) -> EngineResult<()> {
    if contacts.is_empty() {
        return Ok(());
    }
    Ok(store::journeys::exit_erased(conn, tenant, contacts, now).await?)
}
