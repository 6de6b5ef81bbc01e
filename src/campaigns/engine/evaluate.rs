//! One contact's evaluation: its pending events against its journeys and the running
//! campaigns' triggers, and enrolment.

use super::*;
use crate::domain::kinds;

/// One contact: its pending events against its journeys and the running campaigns, the
/// scheduled enrolments, then its due journeys. True when a due journey ran.
pub(super) async fn evaluate(
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
        store::mark_occurrence(conn, tenant_id, *campaign, contact_id, key).await?;
        let def = state
            .campaigns
            .get(conn, tenant_id, *campaign, *version)
            .await?;
        let contact = facts::contact(&scope.facts);
        let ev = facts::event("schedule", &json!({}), now, 1, "rapport");
        if scope
            .gate(conn, &def)
            .await?
            .admits(|a| facts::holds(a, &contact, &ev, now))
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
            .is_some_and(|c| c.status == CampaignStatus::Active);
        if journey.status == JourneyStatus::Active
            && running
            && journey.wake_at.is_some_and(|w| w <= now)
        {
            advance(conn, scope, journey).await?;
            ran = true;
        }
    }
    Ok(ran)
}

/// The contact as it was just after (`new`) or just before (`old`) a `contact.updated`
/// event: the event's changes applied over the current values.
pub(super) fn contact_as_of(current: &Value, event: &Pending, side: &str) -> Value {
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
pub(super) fn rewind(current: &Value, pending: &[Pending]) -> Value {
    let mut contact = current.clone();
    for event in pending.iter().rev() {
        if event.kind == kinds::CONTACT_UPDATED {
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
pub(super) async fn consume(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    journeys: &mut Vec<Journey>,
    event: &Pending,
    as_of: &mut Value,
) -> EngineResult<()> {
    let now = scope.now;
    let previous = as_of.clone();
    if event.kind == kinds::CONTACT_UPDATED {
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
            messages::journey_of(conn, scope.tenant.id, message).await?
        }
        _ => None,
    };
    for j in journeys
        .iter_mut()
        .filter(|j| j.status == JourneyStatus::Active)
    {
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
            end_journey(
                scope,
                j,
                JourneyStatus::Exited,
                &format!("exit_on:{}", event.kind),
                true,
            )?;
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
            && matches!(
                event.kind.as_str(),
                kinds::TICKET_SOLVED | kinds::TICKET_CLOSED
            )
        {
            j.wake_at = Some(now);
            j.dirty = true;
        }
    }

    let mut running: Vec<(Uuid, i32)> = scope
        .campaigns
        .iter()
        .filter(|(_, c)| c.status == CampaignStatus::Active)
        .map(|(id, c)| (*id, c.version))
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
                kinds::CONTACT_CREATED => bound.holds(condition),
                kinds::CONTACT_UPDATED => {
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
        if !scope.gate(conn, &def).await?.admits(|a| bound.holds(a)) {
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
pub(super) async fn enrol(
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
        .find(|j| j.campaign_id == campaign && j.status == JourneyStatus::Active)
    {
        // A previous journey that is due (its last wait is over) runs first: it may end now,
        // and then this event may start the next one.
        let due = previous.wake_at.is_some_and(|w| w <= scope.now);
        if due {
            advance(conn, scope, previous).await?;
        }
        if previous.status == JourneyStatus::Active {
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
            kinds::CAMPAIGN_ENROLLED,
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
            status: JourneyStatus::Active,
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
        store::journeys::save(
            conn,
            scope.tenant.id,
            std::slice::from_ref(previous),
            scope.now,
        )
        .await?;
        previous.dirty = false;
    }
    let inserted = store::journeys::insert(
        conn,
        scope.tenant.id,
        store::journeys::NewJourney {
            id,
            campaign,
            version,
            contact: scope.contact.id,
            at: scope.now,
            key,
            trigger_event_id,
            trigger: &trigger,
        },
    )
    .await?;
    let Some(journey) = inserted else {
        return Ok(());
    };
    metrics::counter!("campaign_enrolments_total").increment(1);
    scope.enrolled(campaign);
    scope.emit(
        kinds::CAMPAIGN_ENROLLED,
        json!({"campaign_id": campaign, "campaign": campaign_name(scope, campaign),
               "journey_id": journey.id, "version": version,
               "trigger_event_id": trigger_event_id}),
        journey.id,
    );
    journeys.push(journey);
    Ok(())
}
