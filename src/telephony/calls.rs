//! The call merge: provider updates folded into a call, the timeline events of facts learned
//! for the first time, and call-back tickets for missed calls.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{Call, CallDirection, CallRow, CallUpdate};
use super::store;
use crate::contacts::store as contacts;
use crate::domain::{TenantContext, TenantId, kinds};
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::messages::store::{SendOptions, best_effort};
use crate::support::model::MessageAuthor;
use crate::support::store as support;
use crate::validate;

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Merges an update into a call (created when new), emits the facts learned for the first time
/// and opens a call-back ticket for a missed inbound call of a known contact (who is sent the
/// `callback_notice` template).
pub async fn apply(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    provider: &str,
    u: &CallUpdate,
    opts: &SendOptions,
) -> StoreResult<Call> {
    // The row exists (stage 0 when new) and is locked before it is read: concurrent deliveries
    // of one call are serialised, so no fact is emitted twice.
    let prev = store::lock_or_create(conn, tenant.id, provider, &u.provider_call_id).await?;

    let external = prev.external_number.clone().or_else(|| {
        u.external_raw.as_deref().map(|raw| {
            validate::phone(raw, Some(&tenant.default_country)).unwrap_or_else(|_| raw.to_owned())
        })
    });
    let contact_id = match (prev.contact_id, &external) {
        (Some(c), _) => Some(c),
        (None, Some(number)) if number.starts_with('+') => {
            contacts::id_by_phone(conn, tenant.id, number).await?
        }
        _ => None,
    };
    let user_email = u.user_email.clone().or(prev.user_email.clone());
    let agent_id = match (&user_email, prev.agent_id) {
        (_, Some(a)) if u.user_email.is_none() => Some(a),
        (Some(email), _) => support::agent_id_by_email(conn, tenant.id, email)
            .await?
            .or(prev.agent_id),
        (None, a) => a,
    };
    let direction = prev.direction.or(u.inbound.map(|i| {
        if i {
            CallDirection::Inbound
        } else {
            CallDirection::Outbound
        }
    }));
    let answered_at = prev.answered_at.or(u.answered_at);
    let stage = prev
        .stage
        .max(u.stage)
        .max(if answered_at.is_some() { 2 } else { 1 });
    let ended_at = prev.ended_at.or(u.ended_at);
    let voicemail_url = u.voicemail_url.clone().or(prev.voicemail_url.clone());
    let missed_reason = prev.missed_reason.clone().or(u.missed_reason.clone());
    let inbound = direction == Some(CallDirection::Inbound);
    let missed = prev.missed
        || (stage == 3 && inbound && answered_at.is_none())
        || (inbound
            && (missed_reason.is_some() || voicemail_url.is_some())
            && answered_at.is_none());
    let merged = CallRow {
        id: prev.id,
        direction,
        external_number: external,
        contact_id,
        user_name: u.user_name.clone().or(prev.user_name.clone()),
        user_email,
        agent_id,
        stage,
        missed,
        missed_reason: if missed && missed_reason.is_none() && voicemail_url.is_some() {
            Some("voicemail".to_owned())
        } else {
            missed_reason
        },
        started_at: earliest(prev.started_at, u.started_at),
        answered_at,
        ended_at,
        duration_secs: prev.duration_secs.max(u.duration_secs),
        recording_url: u.recording_url.clone().or(prev.recording_url.clone()),
        voicemail_url,
        tags: u.tags.clone().unwrap_or(prev.tags.clone()),
        comments: u.comments.clone().unwrap_or(prev.comments.clone()),
        ticket_id: prev.ticket_id,
    };
    store::save(conn, tenant.id, &merged).await?;

    if let Some(contact) = merged.contact_id {
        emit_new_facts(conn, tenant.id, contact, &prev, &merged).await?;
        if merged.missed && inbound && merged.ticket_id.is_none() {
            open_callback_ticket(conn, tenant, contact, &merged, opts).await?;
        }
    }
    store::get(conn, tenant.id, merged.id)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("call vanished")))
}

async fn emit_new_facts(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    prev: &CallRow,
    now: &CallRow,
) -> StoreResult<()> {
    let base = json!({"call_id": now.id, "direction": now.direction, "number": now.external_number,
                      "agent_id": now.agent_id, "user_name": now.user_name});
    let with = |extra: Value| {
        let mut v = base.clone();
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    let fallback = now
        .started_at
        .or(now.answered_at)
        .or(now.ended_at)
        .unwrap_or_else(Utc::now);
    let mut facts: Vec<(&str, DateTime<Utc>, Value)> = Vec::new();
    // A contact matched only now (its number came later) gets the whole story at once.
    let newly_matched = prev.contact_id.is_none();
    if prev.stage == 0 || newly_matched {
        facts.push((
            kinds::CALL_STARTED,
            now.started_at.unwrap_or(fallback),
            base.clone(),
        ));
    }
    if now.answered_at.is_some() && (prev.answered_at.is_none() || newly_matched) {
        facts.push((
            kinds::CALL_ANSWERED,
            now.answered_at.unwrap_or(fallback),
            base.clone(),
        ));
    }
    if now.stage == 3 && (prev.stage < 3 || newly_matched) {
        let at = now.ended_at.unwrap_or(fallback);
        facts.push((
            kinds::CALL_ENDED,
            at,
            with(
                json!({"duration_secs": now.duration_secs, "recording_url": now.recording_url,
            "voicemail_url": now.voicemail_url, "missed": now.missed}),
            ),
        ));
    }
    if now.missed && (!prev.missed || newly_matched) {
        facts.push((
            kinds::CALL_MISSED,
            now.ended_at.unwrap_or(fallback),
            with(json!({"reason": now.missed_reason, "voicemail_url": now.voicemail_url})),
        ));
    }
    for (kind, at, properties) in facts {
        events::emit_about_at(
            conn,
            tenant,
            contact,
            kind,
            properties,
            Some(("call", now.id)),
            at,
        )
        .await?;
    }
    Ok(())
}

/// A missed call is added to the contact's open phone ticket, or opens one, for a call-back;
/// a new one sends the customer the `callback_notice` template.
async fn open_callback_ticket(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    contact: Uuid,
    call: &CallRow,
    opts: &SendOptions,
) -> StoreResult<()> {
    let at = call.ended_at.or(call.started_at).unwrap_or_else(Utc::now);
    let when = match tenant.timezone.parse::<chrono_tz::Tz>() {
        Ok(zone) => at
            .with_timezone(&zone)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string(),
        Err(_) => at.format("%Y-%m-%d %H:%M UTC").to_string(),
    };
    let (subject, note) = crate::support::notes::missed_call(
        &tenant.default_locale,
        call.external_number.as_deref(),
        &when,
        call.voicemail_url.as_deref(),
    );
    let existing = support::lock_open_ticket(conn, tenant.id, contact, "phone").await?;
    let ticket = match existing {
        Some(id) => {
            support::insert_message(
                conn,
                tenant.id,
                id,
                MessageAuthor::System,
                None,
                &note,
                false,
            )
            .await?;
            id
        }
        None => {
            let row = support::NewTicketRow {
                contact_id: contact,
                channel: "phone",
                subject: &subject,
                body: &note,
                author: MessageAuthor::System,
                category: Some("callback"),
                priority: "high",
                assignee: None,
            };
            let ticket = support::create_ticket(conn, tenant, &row).await?;
            let notice = crate::support::notify::customer(
                conn,
                tenant,
                &ticket,
                "callback_notice",
                json!({}),
                opts,
            )
            .await;
            best_effort(notice, tenant.id, "the call-back notice")?;
            ticket.id
        }
    };
    store::set_ticket(conn, tenant.id, call.id, ticket).await
}
