//! Running a journey's steps: waits, quiet hours, sends and hand-overs to an agent.

use super::*;

/// What a send step decided.
pub(super) enum SendOutcome {
    /// Queued or recorded as suppressed: go on.
    Done,
    /// Not now (quiet hours, an open ticket): look again at this time.
    Later(DateTime<Utc>),
    /// The step could not send and ended the journey (a missing template, one that does not
    /// render): go no further.
    Ended,
}

/// Runs a journey's steps until it has to wait or ends.
pub(super) async fn advance(
    conn: &mut PgConnection,
    scope: &Scope<'_>,
    j: &mut Journey,
) -> EngineResult<()> {
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
            return end_journey(scope, j, JourneyStatus::Completed, "completed", false);
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
                return end_journey(scope, j, JourneyStatus::Exited, "exit_step", false);
            }
        }
    }
    end_journey(scope, j, JourneyStatus::Exited, "too_many_steps", false)
}

/// Where a journey's current wait stands.
pub(super) enum Timer {
    /// The journey just reached the wait, which ends then.
    Started(DateTime<Utc>),
    /// Still waiting.
    Running,
    /// The wait is over.
    Over,
}

/// Starts, checks or ends the current step's wait of `span`, setting when to wake.
pub(super) fn timer(j: &mut Journey, span: chrono::Duration, now: DateTime<Utc>) -> Timer {
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
pub(super) fn zone(scope: &Scope<'_>) -> chrono_tz::Tz {
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
pub(super) async fn send(
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
        end_journey(
            scope,
            j,
            JourneyStatus::Exited,
            &format!("template_missing:{template}"),
            false,
        )?;
        return Ok(SendOutcome::Ended);
    };
    let marketing = found.purpose == Purpose::Marketing;
    let mut suppress: Option<&str> = None;
    if marketing && def.suppress_while_ticket_open {
        let open = support::count_open_tickets(conn, scope.tenant.id, scope.contact.id).await?;
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
        let recent = store::count_marketing_sends(
            conn,
            scope.tenant.id,
            scope.contact.id,
            now - cap.per.as_chrono(),
            now,
        )
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
        ticket: None,
        suppress,
    };
    let message = match messages::enqueue(conn, scope.tenant, compose, scope.opts).await {
        Ok(m) => m,
        // The template no longer renders for this contact: the journey cannot go on.
        Err(e) if e.is_permanent() => {
            let reason = format!("send_failed: {e}");
            end_journey(scope, j, JourneyStatus::Exited, &reason, false)?;
            return Ok(SendOutcome::Ended);
        }
        Err(e) => return Err(e.into()),
    };
    if message.status == MessageStatus::Queued && marketing {
        store::record_marketing_send(
            conn,
            scope.tenant.id,
            scope.contact.id,
            now,
            message.id,
            j.campaign_id,
        )
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
pub(super) async fn notify_agent(
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
            support::active_agent(conn, scope.tenant.id, owner).await?
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
    let trigger_kind = j.trigger_event["type"].as_str().unwrap_or("schedule");
    let (default_subject, default_body) = crate::support::notes::campaign_handover(
        &scope.tenant.default_locale,
        &def.name,
        &who,
        trigger_kind,
        contact.phone.as_deref(),
    );
    let subject = subject.map(str::to_owned).unwrap_or(default_subject);
    let body = note.map(str::to_owned).unwrap_or(default_body);
    let (ticket, agent) = if create_ticket {
        let row = support::NewTicketRow {
            contact_id: contact.id,
            channel: "phone",
            subject: &subject,
            body: &body,
            category: Some("campaign"),
            priority,
            author: crate::support::model::MessageAuthor::System,
            assignee: owner,
        };
        let ticket = support::create_ticket(conn, scope.tenant, &row).await?;
        (Some(ticket.id), ticket.assignee_id)
    } else if owner.is_some() {
        (None, owner)
    } else {
        (None, support::next_agent(conn, scope.tenant.id).await?)
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
