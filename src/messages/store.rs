//! SQL for the outbox: enqueueing (inside the caller's transaction), claiming with a lease,
//! and recording each attempt's outcome.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::model::{Attempt, AttemptResult, Compose, Message};
use crate::channels::Receipt;
use crate::contacts::model::Contact;
use crate::contacts::store as contacts;
use crate::domain::{Channel, ConsentStatus, Purpose, kinds};
use crate::domain::{TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::templates::model::{Rendered, Variants};
use crate::templates::sandbox::SandboxError;
use crate::templates::{render, store as templates};
use crate::tenants::store as tenants;

/// What enqueueing needs besides the transaction.
#[derive(Clone)]
pub struct SendOptions {
    pub max_attempts: i32,
    /// Base of tracking and unsubscribe links, without a trailing slash.
    pub public_url: String,
    pub signer: crate::signing::Signer,
    /// Where tenants' templates run.
    pub sandbox: crate::templates::sandbox::Sandbox,
}

/// The LISTEN/NOTIFY channel that wakes workers when a message is queued.
pub const NOTIFY_CHANNEL: &str = "rapport_outbox";

const MESSAGE_COLUMNS: &str =
    "id, contact_id, agent_id, channel, purpose, template_key, locale, recipient,
    subject, body_text, body_html, extras, status, status_reason, provider, provider_message_id,
    attempts, next_attempt_at, created_at, updated_at, sent_at, delivered_at";

/// Wakes the dispatchers when the caller's transaction commits (NOTIFY is delivered then).
async fn wake_workers(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    crate::db::notify(conn, NOTIFY_CHANNEL).await
}

/// How a tenant's Viber provider addresses people: the bot API by Viber user id, Infobip by
/// phone number, the `log` provider by either.
#[derive(Debug, Clone, Copy)]
enum ViberAddress {
    UserId,
    Phone,
    Either,
}

async fn viber_address(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<ViberAddress> {
    let provider: Option<String> = sqlx::query_scalar(
        "SELECT provider FROM channel_settings WHERE tenant_id = $1 AND channel = 'viber'",
    )
    .bind(tenant)
    .fetch_optional(conn)
    .await?;
    Ok(match provider.as_deref() {
        Some("viber") => ViberAddress::UserId,
        Some("infobip") => ViberAddress::Phone,
        _ => ViberAddress::Either,
    })
}

/// The contact's address on a channel.
fn address(contact: &Contact, channel: Channel, viber: ViberAddress) -> Option<&str> {
    match (channel, viber) {
        (Channel::Email, _) => contact.email.as_deref(),
        (Channel::Sms, _) => contact.phone.as_deref(),
        (Channel::Viber, ViberAddress::UserId) => contact.viber_id.as_deref(),
        (Channel::Viber, ViberAddress::Phone) => contact.phone.as_deref(),
        (Channel::Viber, ViberAddress::Either) => {
            contact.viber_id.as_deref().or(contact.phone.as_deref())
        }
    }
}

/// Why a message may not go to this contact on this channel, if it may not: marketing needs an
/// opt-in (`no_consent` without one, `opted_out` after an unsubscribe); transactional messages
/// need only no opt-out.
pub fn consent_refusal(
    contact: &Contact,
    channel: Channel,
    purpose: Purpose,
) -> Option<&'static str> {
    match (purpose, contact.consents.status(channel, purpose)) {
        (Purpose::Marketing, Some(ConsentStatus::OptedIn)) => None,
        (Purpose::Marketing, Some(ConsentStatus::OptedOut)) => Some("opted_out"),
        (Purpose::Marketing, None) => Some("no_consent"),
        (Purpose::Transactional, Some(ConsentStatus::OptedOut)) => Some("opted_out"),
        (Purpose::Transactional, _) => None,
    }
}

/// Why a message could not be queued. Nothing is written when enqueueing fails.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("no contact with id {0}")]
    ContactNotFound(Uuid),
    #[error("template: no template with key `{0}`")]
    UnknownTemplate(String),
    #[error("template: the template has no variant")]
    NoVariant,
    /// The template does not render for this contact, or the renderer is out of reach.
    #[error("{}", render_detail(.0))]
    Render(#[from] SandboxError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for EnqueueError {
    fn from(e: sqlx::Error) -> Self {
        EnqueueError::Store(e.into())
    }
}

/// A render error names the template's field (`template.sms.text: ...`).
fn render_detail(e: &SandboxError) -> String {
    match e {
        SandboxError::Render(r) => format!("template.{}: {}", r.field, r.message),
        SandboxError::Unavailable(why) => format!("the template renderer is unavailable: {why}"),
    }
}

/// A message Rapport sends on its own behalf around something the customer or an agent did
/// (an acknowledgement, a confirmation, an alert): a tenant's own template that cannot be used
/// must not undo that act, so such failures are logged (`what` names the message) and give
/// None; only the database's failures are errors.
pub fn best_effort<T>(
    queued: Result<T, EnqueueError>,
    tenant: TenantId,
    what: &str,
) -> StoreResult<Option<T>> {
    match queued {
        Ok(t) => Ok(Some(t)),
        Err(EnqueueError::Store(e)) => Err(e),
        Err(e) => {
            tracing::warn!(%tenant, error = %e, "{what} cannot be queued");
            Ok(None)
        }
    }
}

impl EnqueueError {
    /// The message cannot be composed for this contact as things stand (no retry helps):
    /// a journey that wanted to send it cannot go on.
    pub fn is_permanent(&self) -> bool {
        match self {
            EnqueueError::ContactNotFound(_)
            | EnqueueError::UnknownTemplate(_)
            | EnqueueError::NoVariant
            | EnqueueError::Render(SandboxError::Render(_)) => true,
            EnqueueError::Render(SandboxError::Unavailable(_)) | EnqueueError::Store(_) => false,
        }
    }
}

/// A message's template, frozen when the message was queued: the variant chosen (one channel,
/// one locale) and the variables it sees. Kept in `messages.compose` until the worker that
/// sends the message renders it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferred {
    pub variants: Variants,
    pub locale: String,
    pub context: Value,
}

/// What enqueueing decided about a message, before any template runs.
#[derive(Debug, Clone)]
pub struct Planned {
    id: Uuid,
    tenant: TenantId,
    contact_id: Uuid,
    channel: Channel,
    purpose: Purpose,
    template_key: String,
    recipient: Option<String>,
    journey: Option<(Uuid, Uuid)>,
    ticket: Option<Uuid>,
    max_attempts: i32,
    decision: Decision,
}

#[derive(Debug, Clone, PartialEq)]
enum Decision {
    /// Recorded as suppressed, with the reason; no template runs.
    Suppress(String),
    /// Rendered, then sent.
    Send(Deferred),
}

impl Planned {
    /// Decided the same way: what was rendered for one is right for the other.
    fn same_as(&self, other: &Planned) -> bool {
        self.id == other.id
            && self.channel == other.channel
            && self.purpose == other.purpose
            && self.recipient == other.recipient
            && self.template_key == other.template_key
            && self.decision == other.decision
    }
}

/// A message planned and rendered outside any transaction, for [`enqueue_composed`].
pub struct Composed {
    planned: Planned,
    rendered: Option<Rendered>,
}

/// Queues a message (or records it as suppressed, with the reason) in the caller's
/// transaction, and wakes the workers when the transaction commits. No tenant template runs
/// here: the worker that sends the message renders it (see [`Deferred`]), so a slow template
/// never holds the caller's connection or locks. Unknown templates are errors: nothing is
/// written.
pub async fn enqueue(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    c: Compose<'_>,
    opts: &SendOptions,
) -> Result<Message, EnqueueError> {
    let planned = plan(conn, tenant, &c, opts, Uuid::now_v7()).await?;
    Ok(insert(conn, &planned, None, &opts.signer).await?)
}

/// Plans a message and renders its template, holding no database connection while the
/// template runs: render errors are errors here, before anything is written. Then
/// [`enqueue_composed`] writes it in the caller's transaction.
pub async fn compose(
    pool: &PgPool,
    tenant: &TenantContext,
    c: &Compose<'_>,
    opts: &SendOptions,
) -> Result<Composed, EnqueueError> {
    let planned = {
        let mut conn = pool.acquire().await?;
        plan(&mut conn, tenant, c, opts, Uuid::now_v7()).await?
    };
    let rendered = match &planned.decision {
        Decision::Send(d) => Some(
            render_deferred(
                d,
                planned.tenant,
                planned.id,
                planned.channel,
                planned.purpose,
                true,
                opts,
            )
            .await?,
        ),
        Decision::Suppress(_) => None,
    };
    Ok(Composed { planned, rendered })
}

/// Writes a [`compose`]d message in the caller's transaction. The decision is taken again
/// there, on what the transaction sees; if the contact or the template changed meanwhile so
/// that it differs, the message is queued to be rendered by the worker instead (or recorded as
/// suppressed), never sent with a text rendered for something else.
pub async fn enqueue_composed(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    c: &Compose<'_>,
    composed: Composed,
    opts: &SendOptions,
) -> Result<Message, EnqueueError> {
    let planned = plan(conn, tenant, c, opts, composed.planned.id).await?;
    let rendered = composed
        .rendered
        .as_ref()
        .filter(|_| planned.same_as(&composed.planned));
    Ok(insert(conn, &planned, rendered, &opts.signer).await?)
}

/// Decides where, how and whether a message goes: reads only, runs no template.
async fn plan(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    c: &Compose<'_>,
    opts: &SendOptions,
    id: Uuid,
) -> Result<Planned, EnqueueError> {
    let contact = contacts::get(conn, tenant.id, c.contact_id)
        .await?
        .ok_or(EnqueueError::ContactNotFound(c.contact_id))?;
    let template = templates::get(conn, tenant.id, c.template_key)
        .await?
        .ok_or_else(|| EnqueueError::UnknownTemplate(c.template_key.to_owned()))?;
    let preference = preference(&template, c.channels)?;
    let viber = if preference.contains(&Channel::Viber) {
        viber_address(conn, tenant.id).await?
    } else {
        ViberAddress::Either
    };
    let bounced = match (&contact.email, preference.contains(&Channel::Email)) {
        (Some(email), true) => email_suppressed(conn, tenant.id, email).await?,
        _ => false,
    };
    let tenant_row = tenants::get(conn, tenant.id.0)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("tenant {} is missing", tenant.id)))?;
    let shared = Shared {
        tenant,
        template: &template,
        purpose: template.purpose,
        preference: &preference,
        viber,
        tenant_row: &tenant_row,
        opts,
    };
    Ok(decide(&shared, c, &contact, bounced, id))
}

/// The channels to try, in order: the caller's, else every channel the template has.
fn preference(
    template: &crate::templates::model::Template,
    asked: &[Channel],
) -> Result<Vec<Channel>, EnqueueError> {
    let preference: Vec<Channel> = if asked.is_empty() {
        [Channel::Email, Channel::Sms, Channel::Viber]
            .into_iter()
            .filter(|ch| template.variants.has(*ch))
            .collect()
    } else {
        asked.to_vec()
    };
    if preference.is_empty() {
        return Err(EnqueueError::NoVariant);
    }
    Ok(preference)
}

/// What [`decide`] needs besides the contact: read once for many contacts.
struct Shared<'a> {
    tenant: &'a TenantContext,
    template: &'a crate::templates::model::Template,
    purpose: Purpose,
    preference: &'a [Channel],
    viber: ViberAddress,
    tenant_row: &'a crate::tenants::model::Tenant,
    opts: &'a SendOptions,
}

/// Decides a message for one contact: the first channel of the preference the contact can be
/// reached on and has consented to (or why none), and the template's variant in the best
/// locale. Pure: every read was made before.
fn decide(s: &Shared<'_>, c: &Compose<'_>, contact: &Contact, bounced: bool, id: Uuid) -> Planned {
    let (template, purpose, viber) = (s.template, s.purpose, s.viber);
    let mut refusals = Vec::new();
    let mut chosen = None;
    for channel in s.preference {
        let refusal = if !template.variants.has(*channel) {
            Some("no_variant")
        } else if address(contact, *channel, viber).is_none() {
            Some("no_address")
        } else if *channel == Channel::Email && bounced {
            Some("bounced")
        } else {
            consent_refusal(contact, *channel, purpose)
        };
        match refusal {
            None => {
                chosen = Some(*channel);
                break;
            }
            Some(why) => refusals.push(format!("{}: {why}", channel.as_str())),
        }
    }
    let planned = |channel: Channel, decision: Decision| Planned {
        id,
        tenant: s.tenant.id,
        contact_id: contact.id,
        channel,
        purpose,
        template_key: c.template_key.to_owned(),
        recipient: address(contact, channel, viber).map(str::to_owned),
        journey: c.journey,
        ticket: c.ticket,
        max_attempts: s.opts.max_attempts,
        decision,
    };
    let channel = match (c.suppress, chosen) {
        (None, Some(channel)) => channel,
        (forced, chosen) => {
            let channel = chosen.unwrap_or(s.preference[0]);
            let reason = match forced {
                Some(reason) => reason.to_owned(),
                None if s.preference.len() == 1 => refusals[0]
                    .split(": ")
                    .nth(1)
                    .unwrap_or("suppressed")
                    .to_owned(),
                None => refusals.join("; "),
            };
            return planned(channel, Decision::Suppress(reason));
        }
    };
    let available = template.variants.locales(channel);
    let wanted: Vec<&str> = contact
        .locale
        .as_deref()
        .into_iter()
        .chain([s.tenant.default_locale.as_str(), "en"])
        .collect();
    let Some(locale) = render::pick_locale(&available, &wanted) else {
        let reason = format!(
            "no_locale: no {} variant in {}",
            channel.as_str(),
            wanted.join(" or ")
        );
        return planned(channel, Decision::Suppress(reason));
    };
    let mut context = render::context(Some(contact), s.tenant_row, c.event.as_ref(), &c.vars);
    if purpose == Purpose::Marketing {
        let links = super::links::Links::new(&s.opts.signer, &s.opts.public_url, s.tenant.id, id);
        context["unsubscribe_url"] = json!(links.unsubscribe());
    }
    planned(
        channel,
        Decision::Send(Deferred {
            variants: template.variants.only(channel, locale),
            locale: locale.to_owned(),
            context,
        }),
    )
}

/// A broadcast's message, as the same for every member.
pub struct BroadcastSend<'a> {
    pub broadcast_id: Uuid,
    pub template_key: &'a str,
    /// Ordered preference; empty means every channel the template has.
    pub channels: &'a [Channel],
    /// Marketing makes a transactional template's message marketing (consent, unsubscribe
    /// link); None keeps the template's purpose.
    pub purpose: Option<Purpose>,
    pub vars: Value,
    /// The members were read with their `stats` and `last_event_at`; if not, and the
    /// template reads them, they are read here.
    pub members_have_stats: bool,
}

/// One member of a broadcast's page, decided by the broadcast: when its message may go, or
/// why it must not (a frequency cap, an open ticket).
pub struct Member<'a> {
    pub contact: &'a Contact,
    pub suppress: Option<&'a str>,
    pub send_at: DateTime<Utc>,
}

/// What became of a member's message.
#[derive(Debug, Clone)]
pub struct MemberOutcome {
    pub contact_id: Uuid,
    pub message_id: Uuid,
    /// Queued (to go at the member's `send_at`); else suppressed with the reason.
    pub suppressed: Option<String>,
    pub purpose: Purpose,
}

/// Queues a broadcast's messages for a page of members in a few statements, in the caller's
/// transaction: one message per member, decided as [`enqueue`] decides (channel preference,
/// address, bounces, consent, locale) and recorded queued or suppressed with the reason, each
/// with its `message.queued` or `message.suppressed` event. A member who already has a
/// message of this broadcast gets no second one (a unique index; it is left out of the
/// answer). The template is rendered by the worker that sends each message.
pub async fn enqueue_broadcast(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    b: &BroadcastSend<'_>,
    members: &[Member<'_>],
    opts: &SendOptions,
) -> Result<Vec<MemberOutcome>, EnqueueError> {
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let template = templates::get(conn, tenant.id, b.template_key)
        .await?
        .ok_or_else(|| EnqueueError::UnknownTemplate(b.template_key.to_owned()))?;
    // A broadcast may make a transactional template's message marketing, never the reverse.
    let purpose = match template.purpose {
        Purpose::Marketing => Purpose::Marketing,
        Purpose::Transactional => b.purpose.unwrap_or(Purpose::Transactional),
    };
    let preference = preference(&template, b.channels)?;
    let viber = if preference.contains(&Channel::Viber) {
        viber_address(conn, tenant.id).await?
    } else {
        ViberAddress::Either
    };
    let bounced: std::collections::HashSet<String> = if preference.contains(&Channel::Email) {
        let emails: Vec<String> = members
            .iter()
            .filter_map(|m| m.contact.email.as_deref().map(str::to_lowercase))
            .collect();
        sqlx::query_scalar(
            "SELECT address FROM email_suppressions WHERE tenant_id = $1 AND address = ANY($2)",
        )
        .bind(tenant.id)
        .bind(&emails)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect()
    } else {
        Default::default()
    };
    let tenant_row = tenants::get(conn, tenant.id.0)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("tenant {} is missing", tenant.id)))?;
    // The walk left the counters out, by the template it saw when its turn began; a template
    // changed since then to show them gets them.
    let with_stats: HashMap<Uuid, Contact> =
        if !b.members_have_stats && render::reads_contact_stats(&template.variants) {
            let ids: Vec<Uuid> = members.iter().map(|m| m.contact.id).collect();
            contacts::read_many(conn, tenant.id, &ids, contacts::Stats::Read)
                .await?
                .into_iter()
                .map(|c| (c.id, c))
                .collect()
        } else {
            HashMap::new()
        };
    let shared = Shared {
        tenant,
        template: &template,
        purpose,
        preference: &preference,
        viber,
        tenant_row: &tenant_row,
        opts,
    };
    let n = members.len();
    let mut cols = BroadcastColumns::with_capacity(n);
    for m in members {
        let contact = with_stats.get(&m.contact.id).unwrap_or(m.contact);
        let compose = Compose {
            contact_id: m.contact.id,
            template_key: b.template_key,
            channels: &preference,
            vars: b.vars.clone(),
            event: None,
            journey: None,
            ticket: None,
            suppress: m.suppress,
        };
        let bounced = contact
            .email
            .as_deref()
            .is_some_and(|e| bounced.contains(&e.to_lowercase()));
        let p = decide(&shared, &compose, contact, bounced, Uuid::now_v7());
        cols.push(p, m.send_at);
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (tenant_id, id, contact_id, channel, purpose, template_key, locale,
            recipient, status, status_reason, max_attempts, next_attempt_at, compose,
            broadcast_id)
         SELECT $1, u.id, u.c, u.ch, $2, $3, u.loc, u.r, u.st, u.why, $4, u.at, u.compose, $5
         FROM unnest($6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[],
                     $12::text[], $13::timestamptz[], $14::jsonb[])
              AS u(id, c, ch, loc, r, st, why, at, compose)
         ON CONFLICT (tenant_id, broadcast_id, contact_id) WHERE broadcast_id IS NOT NULL
         DO NOTHING
         RETURNING id",
    )
    .bind(tenant.id)
    .bind(purpose.as_str())
    .bind(b.template_key)
    .bind(opts.max_attempts)
    .bind(b.broadcast_id)
    .bind(&cols.id)
    .bind(&cols.contact)
    .bind(&cols.channel)
    .bind(&cols.locale)
    .bind(&cols.recipient)
    .bind(&cols.status)
    .bind(&cols.reason)
    .bind(&cols.at)
    .bind(&cols.compose)
    .fetch_all(&mut *conn)
    .await?;
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    let mut emitted = Vec::with_capacity(inserted.len());
    let mut outcomes = Vec::with_capacity(inserted.len());
    for i in 0..n {
        if !inserted.contains(&cols.id[i]) {
            continue;
        }
        let (kind, properties) = match &cols.reason[i] {
            None => (
                kinds::MESSAGE_QUEUED,
                json!({"message_id": cols.id[i], "channel": cols.channel[i],
                       "template": b.template_key, "purpose": purpose,
                       "broadcast_id": b.broadcast_id}),
            ),
            Some(reason) => (
                kinds::MESSAGE_SUPPRESSED,
                json!({"message_id": cols.id[i], "channel": cols.channel[i],
                       "template": b.template_key, "reason": reason,
                       "broadcast_id": b.broadcast_id}),
            ),
        };
        emitted.push(events::Emitted {
            tenant: tenant.id,
            contact_id: cols.contact[i],
            kind,
            properties,
            subject: Some(("message", cols.id[i])),
        });
        outcomes.push(MemberOutcome {
            contact_id: cols.contact[i],
            message_id: cols.id[i],
            suppressed: cols.reason[i].clone(),
            purpose,
        });
    }
    events::append_many(conn, &emitted).await?;
    if outcomes.iter().any(|o| o.suppressed.is_none()) {
        wake_workers(conn).await?;
    }
    Ok(outcomes)
}

/// A broadcast page's messages, one array per column.
struct BroadcastColumns {
    id: Vec<Uuid>,
    contact: Vec<Uuid>,
    channel: Vec<&'static str>,
    locale: Vec<Option<String>>,
    recipient: Vec<Option<String>>,
    status: Vec<&'static str>,
    reason: Vec<Option<String>>,
    at: Vec<DateTime<Utc>>,
    compose: Vec<Option<sqlx::types::Json<Deferred>>>,
}

impl BroadcastColumns {
    fn with_capacity(n: usize) -> Self {
        BroadcastColumns {
            id: Vec::with_capacity(n),
            contact: Vec::with_capacity(n),
            channel: Vec::with_capacity(n),
            locale: Vec::with_capacity(n),
            recipient: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            reason: Vec::with_capacity(n),
            at: Vec::with_capacity(n),
            compose: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, p: Planned, at: DateTime<Utc>) {
        self.id.push(p.id);
        self.contact.push(p.contact_id);
        self.channel.push(p.channel.as_str());
        self.recipient.push(p.recipient);
        self.at.push(at);
        match p.decision {
            Decision::Suppress(reason) => {
                self.locale.push(None);
                self.status.push("suppressed");
                self.reason.push(Some(reason));
                self.compose.push(None);
            }
            Decision::Send(d) => {
                self.locale.push(Some(d.locale.clone()));
                self.status.push("queued");
                self.reason.push(None);
                self.compose.push(Some(sqlx::types::Json(d)));
            }
        }
    }
}

/// Holds a broadcast's queued messages (`paused`) so that no worker sends them; the ones a
/// worker already holds go out. The number held.
pub async fn pause_broadcast(
    conn: &mut PgConnection,
    tenant: TenantId,
    broadcast: Uuid,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE messages SET status = 'paused', updated_at = now()
         WHERE tenant_id = $1 AND broadcast_id = $2 AND status = 'queued'",
    )
    .bind(tenant)
    .bind(broadcast)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Queues a paused broadcast's messages again, none before its own time; with `per_second`,
/// spaced that far apart from now in their order. The time after the last one's slot.
pub async fn resume_broadcast(
    conn: &mut PgConnection,
    tenant: TenantId,
    broadcast: Uuid,
    per_second: Option<i32>,
) -> StoreResult<DateTime<Utc>> {
    let spacing = per_second.map_or(0.0, |p| 1.0 / f64::from(p));
    let last: Option<DateTime<Utc>> = sqlx::query_scalar(
        "WITH held AS (
            SELECT id, row_number() OVER (ORDER BY next_attempt_at, id) - 1 AS k
            FROM messages
            WHERE tenant_id = $1 AND broadcast_id = $2 AND status = 'paused'
         ), queued AS (
            UPDATE messages m
               SET status = 'queued', updated_at = now(),
                   next_attempt_at = greatest(m.next_attempt_at,
                                              now() + make_interval(secs => held.k * $3))
              FROM held
             WHERE m.tenant_id = $1 AND m.id = held.id
            RETURNING m.next_attempt_at
         )
         SELECT max(next_attempt_at) FROM queued",
    )
    .bind(tenant)
    .bind(broadcast)
    .bind(spacing)
    .fetch_one(&mut *conn)
    .await?;
    wake_workers(conn).await?;
    let now = Utc::now();
    Ok(last.map_or(now, |l| l.max(now)) + chrono::Duration::microseconds((spacing * 1e6) as i64))
}

/// Cancels a broadcast's unsent messages: suppressed, `cancelled`. The number cancelled.
pub async fn cancel_broadcast(
    conn: &mut PgConnection,
    tenant: TenantId,
    broadcast: Uuid,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE messages SET status = 'suppressed', status_reason = 'cancelled',
                compose = NULL, updated_at = now()
         WHERE tenant_id = $1 AND broadcast_id = $2 AND status IN ('queued', 'paused')",
    )
    .bind(tenant)
    .bind(broadcast)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A broadcast's messages by what became of them.
#[derive(Debug, Clone, Default)]
pub struct BroadcastDelivery {
    pub pending: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub failed: i64,
    pub cancelled: i64,
}

pub async fn broadcast_delivery(
    conn: &mut PgConnection,
    tenant: TenantId,
    broadcast: Uuid,
) -> StoreResult<BroadcastDelivery> {
    let (pending, sent, delivered, opened, clicked, failed, cancelled): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'sending', 'paused')),
                count(*) FILTER (WHERE status IN ('sent', 'delivered')),
                count(*) FILTER (WHERE status = 'delivered'),
                count(opened_at), count(clicked_at),
                count(*) FILTER (WHERE status = 'failed'),
                count(*) FILTER (WHERE status = 'suppressed' AND status_reason = 'cancelled')
         FROM messages WHERE tenant_id = $1 AND broadcast_id = $2",
    )
    .bind(tenant)
    .bind(broadcast)
    .fetch_one(conn)
    .await?;
    Ok(BroadcastDelivery {
        pending,
        sent,
        delivered,
        opened,
        clicked,
        failed,
        cancelled,
    })
}

/// Renders a message's template in the sandbox (no database connection is needed) and, for a
/// message to a contact (`track`), puts its links behind the tracking redirects.
pub async fn render_deferred(
    d: &Deferred,
    tenant: TenantId,
    id: Uuid,
    channel: Channel,
    purpose: Purpose,
    track: bool,
    opts: &SendOptions,
) -> Result<Rendered, SandboxError> {
    let mut rendered = opts
        .sandbox
        .render(&d.variants, channel, &d.locale, &d.context)
        .await?;
    if channel == Channel::Email && track {
        let links = super::links::Links::new(&opts.signer, &opts.public_url, tenant, id);
        if let Some(html) = rendered.html.take() {
            let (instrumented, targets) = links.instrument_html(&html);
            rendered.html = Some(instrumented);
            rendered.extras["links"] = json!(targets);
        }
        if purpose == Purpose::Marketing {
            rendered.extras["unsubscribe_url"] = json!(links.unsubscribe());
        }
    }
    Ok(rendered)
}

/// Writes a planned message: suppressed, queued with its rendered text, or queued with its
/// template still to run (`rendered` None).
async fn insert(
    conn: &mut PgConnection,
    p: &Planned,
    rendered: Option<&Rendered>,
    signer: &crate::signing::Signer,
) -> StoreResult<Message> {
    let deferred = match &p.decision {
        Decision::Suppress(reason) => return insert_suppressed(conn, p, reason).await,
        Decision::Send(d) => d,
    };
    let compose = rendered.is_none().then_some(sqlx::types::Json(deferred));
    let mut extras = rendered.map_or_else(|| json!({}), |r| r.extras.clone());
    if let (Some(ticket), Channel::Email) = (p.ticket, p.channel) {
        extras["thread"] = thread(conn, p.tenant, ticket, signer).await?;
    }
    let sql = format!(
        "INSERT INTO messages (tenant_id, id, contact_id, channel, purpose, template_key, locale,
            recipient, subject, body_text, body_html, extras, status, max_attempts, next_attempt_at,
            campaign_id, journey_id, compose, ticket_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'queued', $13, now(), $14, $15,
                 $16, $17)
         RETURNING {MESSAGE_COLUMNS}"
    );
    let message: Message = sqlx::query_as(&sql)
        .bind(p.tenant)
        .bind(p.id)
        .bind(p.contact_id)
        .bind(p.channel.as_str())
        .bind(p.purpose.as_str())
        .bind(&p.template_key)
        .bind(&deferred.locale)
        .bind(&p.recipient)
        .bind(rendered.and_then(|r| r.subject.as_deref()))
        .bind(rendered.and_then(|r| r.text.as_deref()))
        .bind(rendered.and_then(|r| r.html.as_deref()))
        .bind(extras)
        .bind(p.max_attempts)
        .bind(p.journey.map(|j| j.0))
        .bind(p.journey.map(|j| j.1))
        .bind(compose)
        .bind(p.ticket)
        .fetch_one(&mut *conn)
        .await?;
    events::emit_about(
        conn,
        p.tenant,
        p.contact_id,
        kinds::MESSAGE_QUEUED,
        json!({"message_id": p.id, "channel": p.channel, "template": p.template_key,
               "purpose": p.purpose}),
        Some(("message", p.id)),
    )
    .await?;
    wake_workers(conn).await?;
    Ok(message)
}

/// The mail headers that thread a ticket's next email after its earlier ones: `In-Reply-To`
/// the latest, `References` the last twenty (RFC 5322 section 3.6.4). Rapport's own mails are
/// `<message id@sender domain>`, as the SMTP provider writes their `Message-ID`. With a
/// `reply_address` on the email channel, also the `Reply-To` that routes the customer's answer
/// to this ticket: `<local part>+<signed ticket tag>@<domain>`.
async fn thread(
    conn: &mut PgConnection,
    tenant: TenantId,
    ticket: Uuid,
    signer: &crate::signing::Signer,
) -> StoreResult<Value> {
    let (from, reply_address, number): (Option<String>, Option<String>, Option<i64>) =
        sqlx::query_as(
            "SELECT (SELECT settings->>'from' FROM channel_settings
                      WHERE tenant_id = $1 AND channel = 'email'),
                    (SELECT settings->>'reply_address' FROM channel_settings
                      WHERE tenant_id = $1 AND channel = 'email'),
                    (SELECT number FROM tickets WHERE tenant_id = $1 AND id = $2)",
        )
        .bind(tenant)
        .bind(ticket)
        .fetch_one(&mut *conn)
        .await?;
    let domain = crate::channels::email::sender_domain(from.as_deref());
    let earlier: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM (
            SELECT id FROM messages
             WHERE tenant_id = $1 AND ticket_id = $2 AND channel = 'email'
               AND status NOT IN ('suppressed', 'failed')
             ORDER BY id DESC LIMIT 20) last ORDER BY id",
    )
    .bind(tenant)
    .bind(ticket)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<String> = earlier
        .iter()
        .map(|id| format!("<{id}@{domain}>"))
        .collect();
    let mut thread = match ids.last() {
        Some(last) => json!({"in_reply_to": last, "references": ids.join(" ")}),
        None => json!({}),
    };
    if let (Some(address), Some(number)) = (reply_address, number) {
        if let Some(tagged) =
            crate::channels::email::tagged_address(&address, &signer.ticket_tag(tenant.0, number))
        {
            thread["reply_to"] = json!(tagged);
        }
    }
    Ok(thread)
}

/// Whether this address refused mail for good (a hard bounce).
async fn email_suppressed(
    conn: &mut PgConnection,
    tenant: TenantId,
    address: &str,
) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM email_suppressions WHERE tenant_id = $1 AND address = lower($2))",
    )
    .bind(tenant)
    .bind(address)
    .fetch_one(conn)
    .await?)
}

/// A mail server reported that a mail Rapport sent (by its `Message-ID`) could not be
/// delivered: the message becomes `failed` with the reason; a permanent failure also stops
/// email to the address (`suppressed`, reason `bounced`) until the contact's address changes.
/// False when the mail is not one of ours.
pub async fn apply_bounce(
    conn: &mut PgConnection,
    tenant: TenantId,
    message_id: Option<&str>,
    recipient: Option<&str>,
    hard: bool,
    reason: &str,
) -> StoreResult<bool> {
    let ours: Option<(Uuid, Option<Uuid>, Option<String>)> = match message_id {
        Some(id) => {
            sqlx::query_as(
                "SELECT id, contact_id, recipient FROM messages
             WHERE tenant_id = $1 AND channel = 'email' AND provider_message_id = $2",
            )
            .bind(tenant)
            .bind(format!("<{id}>"))
            .fetch_optional(&mut *conn)
            .await?
        }
        None => None,
    };
    let Some((id, contact, sent_to)) = ours else {
        return Ok(false);
    };
    apply_receipt(
        conn,
        tenant,
        &format!("<{}>", message_id.unwrap_or_default()),
        &DeliveryReport::Undelivered(reason.to_owned()),
    )
    .await?;
    let address = recipient.map(str::to_owned).or(sent_to);
    if let (true, Some(address)) = (hard, address) {
        sqlx::query(
            "INSERT INTO email_suppressions (tenant_id, address, reason, contact_id, message_id)
             VALUES ($1, lower($2), $3, $4, $5)
             ON CONFLICT (tenant_id, address) DO UPDATE
                SET reason = excluded.reason, message_id = excluded.message_id",
        )
        .bind(tenant)
        .bind(&address)
        .bind(reason)
        .bind(contact)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

/// The ticket of the newest of these mails Rapport sent (message ids `<uuid@domain>`, as
/// [`thread`] writes them), if one was about a ticket.
pub async fn ticket_of_mails(
    conn: &mut PgConnection,
    tenant: TenantId,
    message_ids: &[String],
) -> StoreResult<Option<Uuid>> {
    let ours: Vec<Uuid> = message_ids
        .iter()
        .filter_map(|id| id.split('@').next())
        .filter_map(|local| Uuid::parse_str(local).ok())
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    Ok(sqlx::query_scalar(
        "SELECT ticket_id FROM messages
         WHERE tenant_id = $1 AND id = ANY($2) AND channel = 'email' AND ticket_id IS NOT NULL
         ORDER BY id DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(&ours)
    .fetch_optional(conn)
    .await?)
}

async fn insert_suppressed(
    conn: &mut PgConnection,
    p: &Planned,
    reason: &str,
) -> StoreResult<Message> {
    let sql = format!(
        "INSERT INTO messages (tenant_id, id, contact_id, channel, purpose, template_key,
            recipient, status, status_reason, max_attempts, next_attempt_at, campaign_id,
            journey_id, ticket_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'suppressed', $8, $9, now(), $10, $11, $12)
         RETURNING {MESSAGE_COLUMNS}"
    );
    let message: Message = sqlx::query_as(&sql)
        .bind(p.tenant)
        .bind(p.id)
        .bind(p.contact_id)
        .bind(p.channel.as_str())
        .bind(p.purpose.as_str())
        .bind(&p.template_key)
        .bind(&p.recipient)
        .bind(reason)
        .bind(p.max_attempts)
        .bind(p.journey.map(|j| j.0))
        .bind(p.journey.map(|j| j.1))
        .bind(p.ticket)
        .fetch_one(&mut *conn)
        .await?;
    events::emit_about(
        conn,
        p.tenant,
        p.contact_id,
        kinds::MESSAGE_SUPPRESSED,
        json!({"message_id": p.id, "channel": p.channel, "template": p.template_key,
               "reason": reason}),
        Some(("message", p.id)),
    )
    .await?;
    Ok(message)
}

pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Message>> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE tenant_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// Messages newest first, optionally of one contact or status, before the cursor id.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Option<Uuid>,
    status: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Message>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE tenant_id = $1 AND ($2::uuid IS NULL OR contact_id = $2)
           AND ($3::text IS NULL OR status = $3) AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(contact_id)
        .bind(status)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

pub async fn attempts(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Vec<Attempt>> {
    Ok(sqlx::query_as(
        "SELECT attempt, provider, started_at, finished_at, outcome, detail, provider_message_id
         FROM message_attempts WHERE tenant_id = $1 AND message_id = $2 ORDER BY attempt",
    )
    .bind(tenant)
    .bind(id)
    .fetch_all(conn)
    .await?)
}

/// A message a worker holds, with what it needs to send it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub tenant_id: TenantId,
    pub id: Uuid,
    /// None for messages to agents: their outcomes go on no timeline.
    pub contact_id: Option<Uuid>,
    pub channel: String,
    pub purpose: String,
    pub recipient: Option<String>,
    pub subject: Option<String>,
    pub body_text: Option<String>,
    pub body_html: Option<String>,
    pub extras: Value,
    /// This attempt's number; it fences the lease: only the holder of this attempt may finish it.
    pub attempts: i32,
    pub max_attempts: i32,
    /// The template still to run (a [`Deferred`]), for messages queued unrendered; read as
    /// JSON so that one unreadable row fails alone instead of failing the claim.
    pub compose: Option<Value>,
    /// The campaign journey that sent it, if one did.
    pub journey_id: Option<Uuid>,
}

/// What both claims do to the `due` rows they picked (by physical address: they are
/// locked): leased to this worker for `$2` seconds, under this attempt's number.
const CLAIM_DUE: &str = "
         UPDATE messages m
            SET status = 'sending', attempts = m.attempts + 1, updated_at = now(),
                locked_until = now() + make_interval(secs => $2)
           FROM due
          WHERE m.ctid = due.ctid
          RETURNING m.tenant_id, m.id, m.contact_id, m.channel, m.purpose, m.recipient, m.subject,
                    m.body_text, m.body_html, m.extras, m.attempts, m.max_attempts, m.compose,
                    m.journey_id";

/// Claims up to `batch` due messages for `lease`. No transaction stays open while they are
/// sent; a worker that dies leaves its lease to expire, and [`sweep_expired_leases`] puts the
/// message back in the queue.
pub async fn claim(
    pool: &PgPool,
    batch: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    // The queue's one good plan: walk `messages_due` in order, stop after `batch`, update
    // those rows where they lie. Right after a burst of sends (a blast of 100,000), before
    // autovacuum has analysed the table, the planner believes it tiny and would fetch and sort
    // every due row, or find each claimed row again through an index that does not start with
    // its key, on every claim. Bitmap and sequential scans are ruled out for this transaction,
    // and the claimed rows are updated by their physical address (stable: they are locked).
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query(
        "SELECT set_config('enable_bitmapscan', 'off', true),
                set_config('enable_seqscan', 'off', true)",
    )
    .execute(&mut *tx)
    .await?;
    // Messages of paced channels (`channel_pacing`) are claimed by [`claim_paced`] only.
    let sql = format!(
        "WITH due AS (
            SELECT ctid FROM messages m
             WHERE status = 'queued' AND next_attempt_at <= now()
               AND NOT EXISTS (SELECT 1 FROM channel_pacing p
                               WHERE p.tenant_id = m.tenant_id AND p.channel = m.channel)
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ) {CLAIM_DUE}"
    );
    let claimed = sqlx::query_as(&sql)
        .bind(batch)
        .bind(lease.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(claimed)
}

/// [`claim`] for one tenant's channel, in the caller's transaction (which holds the
/// channel's pacing row): up to `batch` of its due messages, oldest first.
pub async fn claim_paced(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
    batch: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let sql = format!(
        "WITH due AS (
            SELECT ctid FROM messages
             WHERE tenant_id = $3 AND channel = $4
               AND status = 'queued' AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ) {CLAIM_DUE}"
    );
    sqlx::query_as(&sql)
        .bind(batch)
        .bind(lease.as_secs_f64())
        .bind(tenant)
        .bind(channel)
        .fetch_all(conn)
        .await
}

/// Queues an internal email to an agent (an alert): no consent applies and no timeline gets it.
pub async fn enqueue_to_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    agent_id: Uuid,
    about: Uuid,
    subject: &str,
    text: &str,
    max_attempts: i32,
) -> StoreResult<Option<Uuid>> {
    let id = Uuid::now_v7();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (tenant_id, id, agent_id, channel, purpose, recipient, subject,
            body_text, status, max_attempts, next_attempt_at, about_contact_id)
         SELECT $1, $2, a.id, 'email', 'transactional', a.email, $4, $5, 'queued', $6, now(), $7
         FROM agents a WHERE a.tenant_id = $1 AND a.id = $3
         RETURNING id",
    )
    .bind(tenant)
    .bind(id)
    .bind(agent_id)
    .bind(subject)
    .bind(text)
    .bind(max_attempts)
    .bind(about)
    .fetch_optional(&mut *conn)
    .await?;
    wake_workers(conn).await?;
    Ok(inserted)
}

/// An email to an agent written from a template, for [`enqueue_template_to_agent`].
pub struct ToAgent<'a> {
    pub agent_id: Uuid,
    /// The contact it is about (its erasure reaches the message).
    pub about: Uuid,
    pub template_key: &'a str,
    pub vars: Value,
    /// How long it waits before it may be sent.
    pub delay: Duration,
}

/// Queues an email to an agent written from a template (an alert), in the agent's first
/// language, else the tenant's, else English, due after `delay`. No consent applies and no
/// timeline gets it; the worker that sends it renders it (no template runs here), so its
/// variables can still change until then ([`amend_unsent`]). None when the agent is gone or
/// the template has no email variant.
pub async fn enqueue_template_to_agent(
    conn: &mut PgConnection,
    tenant: TenantId,
    m: ToAgent<'_>,
    max_attempts: i32,
) -> Result<Option<Uuid>, EnqueueError> {
    let ToAgent {
        agent_id,
        about,
        template_key,
        vars,
        delay,
    } = m;
    let agent: Option<(String, Vec<String>)> =
        sqlx::query_as("SELECT email, languages FROM agents WHERE tenant_id = $1 AND id = $2")
            .bind(tenant)
            .bind(agent_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((email, languages)) = agent else {
        return Ok(None);
    };
    let template = templates::get(conn, tenant, template_key)
        .await?
        .ok_or_else(|| EnqueueError::UnknownTemplate(template_key.to_owned()))?;
    let tenant_row = tenants::get(conn, tenant.0)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("tenant {tenant} is missing")))?;
    let available = template.variants.locales(Channel::Email);
    let wanted: Vec<&str> = languages
        .iter()
        .map(String::as_str)
        .chain([tenant_row.default_locale.as_str(), "en"])
        .collect();
    let Some(locale) = render::pick_locale(&available, &wanted) else {
        return Ok(None);
    };
    let deferred = Deferred {
        variants: template.variants.only(Channel::Email, locale),
        locale: locale.to_owned(),
        context: render::context(None, &tenant_row, None, &vars),
    };
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (tenant_id, id, agent_id, channel, purpose, template_key, locale,
            recipient, status, max_attempts, next_attempt_at, about_contact_id, compose)
         VALUES ($1, $2, $3, 'email', 'transactional', $4, $5, $6, 'queued', $7,
                 now() + make_interval(secs => $10), $8, $9)",
    )
    .bind(tenant)
    .bind(id)
    .bind(agent_id)
    .bind(template_key)
    .bind(locale)
    .bind(&email)
    .bind(max_attempts)
    .bind(about)
    .bind(sqlx::types::Json(&deferred))
    .bind(delay.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    wake_workers(conn).await?;
    Ok(Some(id))
}

/// Sets one of the variables (`vars.<path>`) of a message still waiting for its worker to
/// render it, and makes it due now. False when the message is already being sent or gone
/// (a worker holds it, or it was rendered): the caller tells the news another way.
pub async fn amend_unsent(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    path: &[&str],
    value: &Value,
) -> StoreResult<bool> {
    let path: Vec<&str> = ["context", "vars"]
        .into_iter()
        .chain(path.iter().copied())
        .collect();
    let done = sqlx::query(
        "UPDATE messages
            SET compose = jsonb_set(compose, $3, $4), next_attempt_at = now(), updated_at = now()
          WHERE tenant_id = $1 AND id = $2 AND status = 'queued' AND compose IS NOT NULL",
    )
    .bind(tenant)
    .bind(id)
    .bind(&path)
    .bind(value)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    wake_workers(conn).await?;
    Ok(true)
}

/// Puts messages whose worker died holding them (an expired lease) back in the queue, due now,
/// recording the lost attempt; after the last attempt they fail instead. The provider may have
/// accepted the lost attempt: delivery is at-least-once, with the same idempotency key. The
/// number of messages swept.
pub async fn sweep_expired_leases(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let swept: Vec<(TenantId, Uuid, Option<Uuid>, i32, bool)> = sqlx::query_as(
        "UPDATE messages SET locked_until = NULL, updated_at = now(),
            status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
            status_reason = CASE WHEN attempts >= max_attempts
                THEN 'the worker stopped during the last attempt' ELSE status_reason END,
            next_attempt_at = now()
         WHERE (tenant_id, id) IN (
                SELECT tenant_id, id FROM messages
                 WHERE status = 'sending' AND locked_until < now()
                 LIMIT 1000
                 FOR UPDATE SKIP LOCKED)
         RETURNING tenant_id, id, contact_id, attempts, status = 'failed'",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (tenant, id, contact_id, attempt, failed) in &swept {
        sqlx::query(
            "INSERT INTO message_attempts (tenant_id, message_id, attempt, provider, started_at,
                finished_at, outcome, detail)
             VALUES ($1, $2, $3, 'unknown', now(), now(), 'lost',
                     'the worker stopped before recording an outcome (lease expired)')
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(id)
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        if let (true, Some(contact_id)) = (*failed, contact_id) {
            events::emit_about(
                &mut tx,
                *tenant,
                *contact_id,
                kinds::MESSAGE_FAILED,
                json!({"message_id": id, "reason": "the worker stopped during the last attempt"}),
                Some(("message", *id)),
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(swept.len() as u64)
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Sent(Receipt),
    Retry {
        reason: String,
        delay: Duration,
    },
    /// The provider asked to slow down: tried again after `delay` without spending an attempt
    /// (the message gets one more, up to [`MAX_THROTTLED_ATTEMPTS`] in all).
    Throttled {
        reason: String,
        delay: Duration,
    },
    Failed {
        reason: String,
    },
}

/// The most attempts a message may reach by being throttled.
pub const MAX_THROTTLED_ATTEMPTS: i32 = 50;

/// Records an attempt's outcome, its attempt row and its timeline event, in one transaction.
/// False when the lease was lost (another worker took the message over): nothing is written.
pub async fn record_attempt(
    pool: &PgPool,
    m: &Claimed,
    provider: &str,
    started_at: DateTime<Utc>,
    outcome: &AttemptOutcome,
) -> Result<bool, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let recorded = record_attempt_in(&mut tx, m, provider, started_at, outcome).await?;
    if recorded {
        tx.commit().await?;
    }
    Ok(recorded)
}

/// [`record_attempt`] in the caller's transaction (which it leaves uncommitted).
pub async fn record_attempt_in(
    tx: &mut PgConnection,
    m: &Claimed,
    provider: &str,
    started_at: DateTime<Utc>,
    outcome: &AttemptOutcome,
) -> Result<bool, sqlx::Error> {
    let (result, detail, provider_id) = match outcome {
        AttemptOutcome::Sent(r) => (AttemptResult::Sent, None, r.provider_message_id.clone()),
        AttemptOutcome::Retry { reason, .. } | AttemptOutcome::Throttled { reason, .. } => {
            (AttemptResult::Retry, Some(reason.clone()), None)
        }
        AttemptOutcome::Failed { reason } => (AttemptResult::Failed, Some(reason.clone()), None),
    };
    let updated = match outcome {
        AttemptOutcome::Sent(r) => {
            sqlx::query(
                "UPDATE messages SET status = 'sent', provider = $4, provider_message_id = $5,
                    status_reason = NULL, sent_at = now(), locked_until = NULL, updated_at = now()
                 WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3",
            )
            .bind(m.tenant_id)
            .bind(m.id)
            .bind(m.attempts)
            .bind(provider)
            .bind(&r.provider_message_id)
            .execute(&mut *tx)
            .await?
        }
        AttemptOutcome::Retry { reason, delay } | AttemptOutcome::Throttled { reason, delay } => {
            // A throttled attempt is given back: the message may make one more.
            let given_back = i32::from(matches!(outcome, AttemptOutcome::Throttled { .. }));
            sqlx::query(
                "UPDATE messages SET status = 'queued', provider = $4, status_reason = $5,
                    next_attempt_at = now() + make_interval(secs => $6), locked_until = NULL,
                    max_attempts = max_attempts + $7, updated_at = now()
                 WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3",
            )
            .bind(m.tenant_id)
            .bind(m.id)
            .bind(m.attempts)
            .bind(provider)
            .bind(reason)
            .bind(delay.as_secs_f64())
            .bind(given_back)
            .execute(&mut *tx)
            .await?
        }
        AttemptOutcome::Failed { reason } => {
            sqlx::query(
                "UPDATE messages SET status = 'failed', provider = $4, status_reason = $5,
                    locked_until = NULL, updated_at = now()
                 WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3",
            )
            .bind(m.tenant_id)
            .bind(m.id)
            .bind(m.attempts)
            .bind(provider)
            .bind(reason)
            .execute(&mut *tx)
            .await?
        }
    };
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO message_attempts (tenant_id, message_id, attempt, provider, started_at,
            finished_at, outcome, detail, provider_message_id)
         VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8)",
    )
    .bind(m.tenant_id)
    .bind(m.id)
    .bind(m.attempts)
    .bind(provider)
    .bind(started_at)
    .bind(result)
    .bind(&detail)
    .bind(&provider_id)
    .execute(&mut *tx)
    .await?;
    let event = match outcome {
        AttemptOutcome::Sent(_) => Some((
            kinds::MESSAGE_SENT,
            json!({"message_id": m.id, "channel": m.channel,
            "provider": provider, "provider_message_id": provider_id, "attempt": m.attempts}),
        )),
        AttemptOutcome::Failed { reason } => Some((
            kinds::MESSAGE_FAILED,
            json!({"message_id": m.id,
            "channel": m.channel, "provider": provider, "reason": reason, "attempt": m.attempts}),
        )),
        AttemptOutcome::Retry { .. } | AttemptOutcome::Throttled { .. } => None,
    };
    if let (Some((kind, properties)), Some(contact_id)) = (event, m.contact_id) {
        events::emit_about(
            &mut *tx,
            m.tenant_id,
            contact_id,
            kind,
            properties,
            Some(("message", m.id)),
        )
        .await?;
    }
    Ok(true)
}

/// A message rendered by the worker that holds it, for [`record_rendered`].
pub struct RenderedClaim<'a> {
    pub message: &'a Claimed,
    pub rendered: &'a Rendered,
}

/// Writes what deferred messages rendered to (subject, bodies, extras) and clears their
/// templates, in one statement, fenced by the lease like every outcome. A message erased
/// meanwhile (its template cleared) is not written back. Returns those written: only they may
/// be sent.
pub async fn record_rendered(
    pool: &PgPool,
    rendered: &[RenderedClaim<'_>],
) -> Result<std::collections::HashSet<(TenantId, Uuid)>, sqlx::Error> {
    if rendered.is_empty() {
        return Ok(Default::default());
    }
    let col = |f: fn(&RenderedClaim<'_>) -> Option<String>| -> Vec<Option<String>> {
        rendered.iter().map(f).collect()
    };
    let written: Vec<(TenantId, Uuid)> = sqlx::query_as(
        "UPDATE messages m SET subject = u.subject, body_text = u.text, body_html = u.html,
            extras = m.extras || u.extras, compose = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                     $7::jsonb[]) AS u(t, id, attempt, subject, text, html, extras)
         WHERE m.tenant_id = u.t AND m.id = u.id AND m.status = 'sending'
           AND m.attempts = u.attempt AND m.compose IS NOT NULL
         RETURNING m.tenant_id, m.id",
    )
    .bind(
        rendered
            .iter()
            .map(|r| r.message.tenant_id.0)
            .collect::<Vec<_>>(),
    )
    .bind(rendered.iter().map(|r| r.message.id).collect::<Vec<_>>())
    .bind(
        rendered
            .iter()
            .map(|r| r.message.attempts)
            .collect::<Vec<_>>(),
    )
    .bind(col(|r| r.rendered.subject.clone()))
    .bind(col(|r| r.rendered.text.clone()))
    .bind(col(|r| r.rendered.html.clone()))
    .bind(
        rendered
            .iter()
            .map(|r| r.rendered.extras.clone())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?;
    Ok(written.into_iter().collect())
}

/// A message a provider accepted, for [`record_sent`].
#[derive(Debug, Clone)]
pub struct ProviderAccepted {
    pub message: Claimed,
    pub provider: &'static str,
    pub started_at: DateTime<Utc>,
    pub provider_message_id: Option<String>,
}

/// Records a batch of accepted sends in one transaction: the messages, their attempt rows
/// and their `message.sent` events, set-based. Messages whose lease was lost meanwhile are
/// left to their new holder, exactly as [`record_attempt`] does one at a time. Returns how many were
/// recorded.
pub async fn record_sent(
    pool: &PgPool,
    accepted: &[ProviderAccepted],
) -> Result<usize, sqlx::Error> {
    if accepted.is_empty() {
        return Ok(0);
    }
    let tenants: Vec<Uuid> = accepted.iter().map(|a| a.message.tenant_id.0).collect();
    let ids: Vec<Uuid> = accepted.iter().map(|a| a.message.id).collect();
    let attempts: Vec<i32> = accepted.iter().map(|a| a.message.attempts).collect();
    let providers: Vec<&str> = accepted.iter().map(|a| a.provider).collect();
    let provider_ids: Vec<Option<&str>> = accepted
        .iter()
        .map(|a| a.provider_message_id.as_deref())
        .collect();
    let started: Vec<DateTime<Utc>> = accepted.iter().map(|a| a.started_at).collect();
    let mut tx = crate::db::begin(pool).await?;
    let recorded: Vec<(TenantId, Uuid)> = sqlx::query_as(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[],
                                 $6::timestamptz[]) AS u(t, id, attempt, provider, pmid, started)
         ), updated AS (
            UPDATE messages m SET status = 'sent', provider = i.provider,
                provider_message_id = i.pmid, status_reason = NULL, sent_at = now(),
                locked_until = NULL, updated_at = now()
            FROM input i
            WHERE m.tenant_id = i.t AND m.id = i.id AND m.status = 'sending'
              AND m.attempts = i.attempt
            RETURNING m.tenant_id, m.id, i.attempt, i.provider, i.pmid, i.started
         ), attempts AS (
            INSERT INTO message_attempts (tenant_id, message_id, attempt, provider, started_at,
                finished_at, outcome, provider_message_id)
            SELECT tenant_id, id, attempt, provider, started, now(), 'sent', pmid FROM updated
         )
         SELECT tenant_id, id FROM updated",
    )
    .bind(&tenants)
    .bind(&ids)
    .bind(&attempts)
    .bind(&providers)
    .bind(&provider_ids)
    .bind(&started)
    .fetch_all(&mut *tx)
    .await?;
    let recorded: std::collections::HashSet<(TenantId, Uuid)> = recorded.into_iter().collect();
    let mut events_rows: Vec<events::Emitted> = Vec::with_capacity(recorded.len());
    for a in accepted {
        let m = &a.message;
        if !recorded.contains(&(m.tenant_id, m.id)) {
            tracing::warn!(message_id = %m.id, "lease lost before the outcome was recorded; the new holder decides");
            continue;
        }
        if let Some(contact_id) = m.contact_id {
            events_rows.push(events::Emitted {
                tenant: m.tenant_id,
                contact_id,
                kind: kinds::MESSAGE_SENT,
                properties: json!({"message_id": m.id, "channel": m.channel,
                    "provider": a.provider, "provider_message_id": a.provider_message_id,
                    "attempt": m.attempts}),
                subject: Some(("message", m.id)),
            });
        }
    }
    events::append_many(&mut tx, &events_rows).await?;
    tx.commit().await?;
    Ok(recorded.len())
}

/// A delivery receipt's verdict.
#[derive(Debug, Clone)]
pub enum DeliveryReport {
    Delivered,
    /// The provider could not deliver after accepting (undelivered, expired, rejected).
    Undelivered(String),
    /// Seen or read on the device.
    Opened,
}

/// Applies a provider's receipt to the message with this provider id. Transitions only move
/// forward (`sent -> delivered`, `sent|delivered -> failed` is refused once delivered), so a
/// duplicate or late receipt changes nothing; the timeline gets one event per change.
/// False when no message matches or nothing changed.
pub async fn apply_receipt(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider_message_id: &str,
    receipt: &DeliveryReport,
) -> Result<bool, sqlx::Error> {
    let row: Option<(Uuid, Option<Uuid>, String)> =
        match receipt {
            DeliveryReport::Delivered => sqlx::query_as(
                "UPDATE messages SET status = 'delivered', delivered_at = now(), updated_at = now()
             WHERE tenant_id = $1 AND provider_message_id = $2 AND status IN ('sending', 'sent')
             RETURNING id, contact_id, channel",
            )
            .bind(tenant)
            .bind(provider_message_id)
            .fetch_optional(&mut *conn)
            .await?,
            DeliveryReport::Undelivered(reason) => {
                sqlx::query_as(
                    "UPDATE messages SET status = 'failed', status_reason = $3, updated_at = now()
             WHERE tenant_id = $1 AND provider_message_id = $2 AND status IN ('sending', 'sent')
             RETURNING id, contact_id, channel",
                )
                .bind(tenant)
                .bind(provider_message_id)
                .bind(reason)
                .fetch_optional(&mut *conn)
                .await?
            }
            DeliveryReport::Opened => {
                // The same transition as the open pixel's, found by the provider's id.
                let id: Option<Uuid> = sqlx::query_scalar(
                    "SELECT id FROM messages WHERE tenant_id = $1 AND provider_message_id = $2",
                )
                .bind(tenant)
                .bind(provider_message_id)
                .fetch_optional(&mut *conn)
                .await?;
                return match id {
                    Some(id) => mark_opened(conn, tenant, id).await,
                    None => Ok(false),
                };
            }
        };
    let Some((id, contact_id, channel)) = row else {
        return Ok(false);
    };
    // Messages to agents change state but go on no timeline.
    let Some(contact_id) = contact_id else {
        return Ok(true);
    };
    let (kind, properties) = match receipt {
        DeliveryReport::Delivered => (
            kinds::MESSAGE_DELIVERED,
            json!({"message_id": id, "channel": channel}),
        ),
        DeliveryReport::Undelivered(reason) => (
            kinds::MESSAGE_FAILED,
            json!({"message_id": id, "channel": channel, "reason": reason}),
        ),
        DeliveryReport::Opened => return Ok(false),
    };
    events::emit_about(
        conn,
        tenant,
        contact_id,
        kind,
        properties,
        Some(("message", id)),
    )
    .await?;
    Ok(true)
}

/// Records the first open of an email (the tracking pixel); later opens change nothing.
pub async fn mark_opened(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    let row: Option<(Option<Uuid>, String)> = sqlx::query_as(
        "UPDATE messages SET opened_at = now(), updated_at = now(),
            status = CASE WHEN status = 'sent' THEN 'delivered' ELSE status END,
            delivered_at = coalesce(delivered_at, CASE WHEN status = 'sent' THEN now() END)
         WHERE tenant_id = $1 AND id = $2 AND opened_at IS NULL AND status IN ('sent', 'delivered')
         RETURNING contact_id, channel",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((contact_id, channel)) = row else {
        return Ok(false);
    };
    let Some(contact_id) = contact_id else {
        return Ok(true);
    };
    events::emit_about(
        conn,
        tenant,
        contact_id,
        kinds::MESSAGE_OPENED,
        json!({"message_id": id, "channel": channel}),
        Some(("message", id)),
    )
    .await?;
    Ok(true)
}

/// The target of a tracked link, recording the click (each click is an event: campaigns react
/// to which link was clicked). None when the message or link does not exist.
pub async fn click(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    index: u32,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(Option<Uuid>, String, Option<String>)> = sqlx::query_as(
        "UPDATE messages SET clicked_at = coalesce(clicked_at, now()), updated_at = now()
         WHERE tenant_id = $1 AND id = $2 AND jsonb_typeof(extras->'links') = 'array'
           AND jsonb_array_length(extras->'links') > $3
         RETURNING contact_id, channel, extras->'links'->>$3",
    )
    .bind(tenant)
    .bind(id)
    .bind(i32::try_from(index).unwrap_or(i32::MAX))
    .fetch_optional(&mut *conn)
    .await?;
    let Some((contact_id, channel, Some(url))) = row else {
        return Ok(None);
    };
    let Some(contact_id) = contact_id else {
        return Ok(Some(url));
    };
    events::emit_about(
        conn,
        tenant,
        contact_id,
        kinds::MESSAGE_CLICKED,
        json!({"message_id": id, "channel": channel, "link": index, "url": url}),
        Some(("message", id)),
    )
    .await?;
    Ok(Some(url))
}

/// Erasure: the contact's messages, and those to agents about the contact, keep their channel,
/// status and times (for reports) but lose what could identify the person: the contact's
/// address, texts, links and the providers' reasons (which may quote the address).
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE message_attempts a SET detail = NULL
         FROM messages m
         WHERE a.tenant_id = $1 AND m.tenant_id = $1 AND a.message_id = m.id
           AND (m.contact_id = $2 OR m.about_contact_id = $2) AND a.detail IS NOT NULL",
    )
    .bind(tenant)
    .bind(contact)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM email_suppressions WHERE tenant_id = $1 AND contact_id = $2")
        .bind(tenant)
        .bind(contact)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE messages SET subject = NULL, body_text = NULL, body_html = NULL, extras = '{}',
            compose = NULL,
            recipient = CASE WHEN contact_id = $2 THEN NULL ELSE recipient END,
            status_reason = CASE WHEN status_reason IS NULL THEN NULL ELSE 'erased' END,
            updated_at = now()
         WHERE tenant_id = $1 AND (contact_id = $2 OR about_contact_id = $2)",
    )
    .bind(tenant)
    .bind(contact)
    .execute(conn)
    .await?;
    Ok(())
}

/// The journey that sent a message, if a campaign did.
pub async fn journey_of(
    conn: &mut PgConnection,
    tenant: TenantId,
    message: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT journey_id FROM messages WHERE tenant_id = $1 AND id = $2")
            .bind(tenant)
            .bind(message)
            .fetch_optional(conn)
            .await?
            .flatten(),
    )
}
