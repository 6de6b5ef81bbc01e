//! SQL for journeys and the engine's inbox: the rows the rule engine reads under each
//! contact's advisory lock and writes back in bulk at the commit.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::campaigns::model::JourneyStatus;
use crate::domain::{TenantId, kinds};
use crate::error::StoreResult;
use crate::events::store as events;

/// An event as the engine reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub seq: i64,
    pub id: Uuid,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub properties: Value,
    pub occurred_at: DateTime<Utc>,
    pub ordinal: i64,
    pub source: String,
    pub subject_id: Option<Uuid>,
}

/// A pending event and its contact, as loaded for a chunk.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingOf {
    pub contact_id: Uuid,
    #[sqlx(flatten)]
    pub event: Pending,
}

/// A running journey.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Journey {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub version: i32,
    pub contact_id: Uuid,
    pub status: JourneyStatus,
    pub position: Vec<i32>,
    pub wake_at: Option<DateTime<Utc>>,
    pub wait_until: Option<DateTime<Utc>>,
    pub held_since: Option<DateTime<Utc>>,
    pub trigger_event: Value,
    pub last_message_id: Option<Uuid>,
    pub exit_reason: Option<String>,
    pub converted: bool,
    /// Changed since it was read (or written): saved at the commit.
    #[sqlx(skip)]
    pub dirty: bool,
    /// Not in the database yet: inserted at the commit, in its state then.
    #[sqlx(skip)]
    pub new: Option<Enrolment>,
}

/// What a journey inserted at the commit starts from.
#[derive(Debug, Clone)]
pub struct Enrolment {
    pub key: String,
    pub trigger_event_id: Option<Uuid>,
    pub enrolled_at: DateTime<Utc>,
}

pub const JOURNEY_COLUMNS: &str = "id, campaign_id, version, contact_id, status, position, wake_at,
    wait_until, held_since, trigger_event, last_message_id, exit_reason, converted";

/// Writes journeys as they now stand: an UPDATE of those read from the database, then an
/// INSERT of those enrolled since (in that order, so a journey that ended makes room for the
/// next one of its campaign), one statement each.
pub async fn save(
    conn: &mut PgConnection,
    tenant: TenantId,
    journeys: &[Journey],
    now: DateTime<Utc>,
) -> StoreResult<()> {
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
                .map(|j| match j.status {
                    JourneyStatus::Active => &j.trigger_event,
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

/// The contacts with events waiting in the inbox (the oldest `limit` events, skipping those
/// that failed `max_failures` times), oldest first: tenant, contact, and how many of those
/// events are the contact's.
pub async fn waiting(
    conn: &mut PgConnection,
    max_failures: i32,
    limit: i64,
) -> StoreResult<Vec<(TenantId, Uuid, i64)>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, contact_id, count(*) FROM (
            SELECT tenant_id, contact_id, seq FROM campaign_inbox WHERE failures < $1
            ORDER BY seq LIMIT $2) oldest
         GROUP BY tenant_id, contact_id ORDER BY min(seq)",
    )
    .bind(max_failures)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The contacts with active journeys of active campaigns due by `now` (the `limit` most
/// overdue journeys).
pub async fn due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> StoreResult<Vec<(TenantId, Uuid)>> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT tenant_id, contact_id FROM (
            SELECT j.tenant_id, j.contact_id FROM journeys j
              JOIN campaigns c ON c.tenant_id = j.tenant_id AND c.id = j.campaign_id
             WHERE j.status = 'active' AND j.wake_at <= $1 AND c.status = 'active'
             ORDER BY j.wake_at LIMIT $2) due",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// When the first active journey of an active campaign due after `now` is due, if any: an
/// idle engine sleeps until then rather than a poll interval. It walks the `journeys_due`
/// index from `now` past the journeys of paused campaigns, so the engine asks only when it
/// is about to sleep, not every round.
pub async fn next_wake(
    pool: &sqlx::PgPool,
    now: DateTime<Utc>,
) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT j.wake_at FROM journeys j
           JOIN campaigns c ON c.tenant_id = j.tenant_id AND c.id = j.campaign_id
          WHERE j.status = 'active' AND j.wake_at > $1 AND c.status = 'active'
          ORDER BY j.wake_at LIMIT 1",
    )
    .bind(now)
    .fetch_optional(pool)
    .await?)
}

/// After a contact's evaluation failed: its waiting events count one more failure, and its
/// due journeys are looked at again in a minute, not in a tight loop.
pub async fn set_aside(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    contact: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    // Each on its own: one failing must not keep the other from being tried.
    let bumped = sqlx::query(
        "UPDATE campaign_inbox SET failures = failures + 1
         WHERE tenant_id = $1 AND contact_id = $2",
    )
    .bind(tenant)
    .bind(contact)
    .execute(pool)
    .await;
    let deferred = sqlx::query(
        "UPDATE journeys SET wake_at = $3 + interval '1 minute'
         WHERE tenant_id = $1 AND contact_id = $2 AND status = 'active' AND wake_at <= $3",
    )
    .bind(tenant)
    .bind(contact)
    .bind(now)
    .execute(pool)
    .await;
    bumped?;
    deferred?;
    Ok(())
}

/// The contacts' waiting events in inbox order (so each contact gets its oldest), at most
/// `limit`, skipping those that failed `max_failures` times.
pub async fn pending_of(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
    max_failures: i32,
    limit: i64,
) -> StoreResult<Vec<PendingOf>> {
    Ok(sqlx::query_as(
        "SELECT i.contact_id, i.seq, e.id, e.type, e.properties, e.occurred_at, e.ordinal,
                e.source, e.subject_id
         FROM campaign_inbox i JOIN events e ON e.tenant_id = i.tenant_id AND e.id = i.event_id
         WHERE i.tenant_id = $1 AND i.contact_id = ANY($2) AND i.failures < $3
         ORDER BY i.seq LIMIT $4",
    )
    .bind(tenant)
    .bind(contacts)
    .bind(max_failures)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The contacts' active journeys, locked (in id order) until the transaction ends.
pub async fn lock_active(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
) -> StoreResult<Vec<Journey>> {
    let sql = format!(
        "SELECT {JOURNEY_COLUMNS} FROM journeys
         WHERE tenant_id = $1 AND contact_id = ANY($2) AND status = 'active'
         ORDER BY id FOR UPDATE"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(contacts)
        .fetch_all(conn)
        .await?)
}

/// When each of the contacts last enrolled in each of the campaigns: contact, campaign, time.
pub async fn last_enrolled(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaigns: &[Uuid],
    contacts: &[Uuid],
) -> StoreResult<Vec<(Uuid, Uuid, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT contact_id, campaign_id, max(enrolled_at) FROM journeys
         WHERE tenant_id = $1 AND campaign_id = ANY($2) AND contact_id = ANY($3)
         GROUP BY contact_id, campaign_id",
    )
    .bind(tenant)
    .bind(campaigns)
    .bind(contacts)
    .fetch_all(conn)
    .await?)
}

/// Removes consumed events from the inbox.
pub async fn consumed(conn: &mut PgConnection, tenant: TenantId, seqs: &[i64]) -> StoreResult<()> {
    sqlx::query("DELETE FROM campaign_inbox WHERE tenant_id = $1 AND seq = ANY($2)")
        .bind(tenant)
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(())
}

/// Ends the active journeys of erased contacts.
pub async fn exit_erased(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
    now: DateTime<Utc>,
) -> StoreResult<()> {
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

/// The journey whose message could not be rendered when the worker came to send it ends
/// there: `exited` with the reason, also if it had already run its last step (it did not
/// complete); the message stops counting against the frequency caps, and the contact's
/// timeline says so. Nothing changes for a journey that had already exited.
pub async fn end_unsent(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    journey: Uuid,
    message: Uuid,
    reason: &str,
) -> StoreResult<()> {
    let ended: Option<(Uuid, Uuid, i32, String, bool)> = sqlx::query_as(
        "UPDATE journeys j SET status = 'exited', exit_reason = $3, wake_at = NULL,
            ended_at = coalesce(j.ended_at, now()), trigger_event = '{}', updated_at = now()
           FROM campaigns c
          WHERE j.tenant_id = $1 AND j.id = $2 AND j.status IN ('active', 'completed')
            AND c.tenant_id = j.tenant_id AND c.id = j.campaign_id
          RETURNING j.contact_id, j.campaign_id, j.version, c.name, j.converted",
    )
    .bind(tenant)
    .bind(journey)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM marketing_sends WHERE tenant_id = $1 AND contact_id = $2 AND message_id = $3",
    )
    .bind(tenant)
    .bind(contact)
    .bind(message)
    .execute(&mut *conn)
    .await?;
    if let Some((contact, campaign, version, name, converted)) = ended {
        events::emit_about(
            conn,
            tenant,
            contact,
            kinds::CAMPAIGN_EXITED,
            json!({"campaign_id": campaign, "campaign": name, "journey_id": journey,
                   "version": version, "reason": reason, "converted": converted}),
            Some(("journey", journey)),
        )
        .await?;
    }
    Ok(())
}

/// A journey to insert now (an enrolment that must exist before the commit).
pub struct NewJourney<'a> {
    pub id: Uuid,
    pub campaign: Uuid,
    pub version: i32,
    pub contact: Uuid,
    pub at: DateTime<Utc>,
    pub key: &'a str,
    pub trigger_event_id: Option<Uuid>,
    pub trigger: &'a Value,
}

/// Inserts an active journey at its first step, unless the unique indexes say the contact is
/// already enrolled (then None).
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    new: NewJourney<'_>,
) -> StoreResult<Option<Journey>> {
    let sql = format!(
        "INSERT INTO journeys (tenant_id, id, campaign_id, version, contact_id, status, position,
            wake_at, enrol_key, trigger_event_id, trigger_event, enrolled_at)
         VALUES ($1, $2, $3, $4, $5, 'active', '{{0}}', $6, $7, $8, $9, $6)
         ON CONFLICT DO NOTHING
         RETURNING {JOURNEY_COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(new.id)
        .bind(new.campaign)
        .bind(new.version)
        .bind(new.contact)
        .bind(new.at)
        .bind(new.key)
        .bind(new.trigger_event_id)
        .bind(new.trigger)
        .fetch_optional(conn)
        .await?)
}

/// Erasure: the contact's journeys end and keep no copy of its events' properties; its
/// waiting events leave the inbox.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE journeys SET trigger_event = '{}', wake_at = NULL, updated_at = now(),
            exit_reason = CASE WHEN status = 'active' THEN 'contact_erased' ELSE exit_reason END,
            ended_at = coalesce(ended_at, now()),
            status = CASE WHEN status = 'active' THEN 'exited' ELSE status END
         WHERE tenant_id = $1 AND contact_id = $2",
    )
    .bind(tenant)
    .bind(contact)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM campaign_inbox WHERE tenant_id = $1 AND contact_id = $2")
        .bind(tenant)
        .bind(contact)
        .execute(conn)
        .await?;
    Ok(())
}
