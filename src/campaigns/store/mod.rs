//! SQL for campaigns, their versions and their stats.

pub mod journeys;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{
    Campaign, CampaignStats, CampaignStatus, Definition, JourneyStatus, JourneyView,
};
use crate::domain::{TenantId, kinds};
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::templates::store as templates;
use crate::validate::{FieldError, Invalid};

#[derive(sqlx::FromRow)]
struct CampaignRow {
    id: Uuid,
    status: CampaignStatus,
    version: i32,
    definition: serde_json::Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    activated_at: Option<DateTime<Utc>>,
    archived_at: Option<DateTime<Utc>>,
}

const SELECT: &str = "SELECT c.id, c.status, c.version, v.definition, c.created_at, c.updated_at,
        c.activated_at, c.archived_at
     FROM campaigns c JOIN campaign_versions v
       ON v.tenant_id = c.tenant_id AND v.campaign_id = c.id AND v.version = c.version";

fn to_campaign(row: CampaignRow) -> StoreResult<Campaign> {
    let definition = parse_definition(row.definition)?;
    Ok(Campaign {
        id: row.id,
        status: row.status,
        version: row.version,
        definition,
        created_at: row.created_at,
        updated_at: row.updated_at,
        activated_at: row.activated_at,
        archived_at: row.archived_at,
    })
}

/// A stored definition (it was valid when written, so failing to read it is a bug).
pub fn parse_definition(value: serde_json::Value) -> StoreResult<Definition> {
    serde_json::from_value(value)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("stored campaign definition: {e}")))
}

pub fn campaign_not_found(id: Uuid) -> StoreError {
    StoreError::NotFound(format!("no campaign with id {id}"))
}

/// Checks what only the database knows: every `send` names a template of this tenant that has
/// a variant on at least one of the step's channels.
pub async fn check_templates(
    conn: &mut PgConnection,
    tenant: TenantId,
    def: &Definition,
) -> StoreResult<()> {
    let mut errors = Vec::new();
    for (field, key, channels) in def.templates() {
        match templates::get(conn, tenant, key).await? {
            None => errors.push(FieldError::new(
                field,
                format!("no template with key `{key}`"),
            )),
            Some(t) => {
                let usable = if channels.is_empty() {
                    [
                        crate::domain::Channel::Email,
                        crate::domain::Channel::Sms,
                        crate::domain::Channel::Viber,
                    ]
                    .iter()
                    .any(|c| t.variants.has(*c))
                } else {
                    channels.iter().any(|c| t.variants.has(*c))
                };
                if !usable {
                    let names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
                    errors.push(FieldError::new(
                        field,
                        format!("template `{key}` has no variant for {}", names.join(", ")),
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(Invalid(errors)))
    }
}

/// Creates a draft campaign with its first version.
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    def: &Definition,
) -> StoreResult<Campaign> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO campaigns (tenant_id, id, name, status, version) VALUES ($1, $2, $3, 'draft', 1)",
    )
    .bind(tenant)
    .bind(id)
    .bind(def.name.trim())
    .execute(&mut *conn)
    .await?;
    insert_version(conn, tenant, id, 1, def).await?;
    get(conn, tenant, id)
        .await?
        .ok_or_else(|| campaign_not_found(id))
}

async fn insert_version(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    version: i32,
    def: &Definition,
) -> StoreResult<()> {
    let definition = serde_json::to_value(def)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("serialise definition: {e}")))?;
    sqlx::query(
        "INSERT INTO campaign_versions (tenant_id, campaign_id, version, definition)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(tenant)
    .bind(id)
    .bind(version)
    .bind(definition)
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds a version; journeys already running keep the version they started on.
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    def: &Definition,
) -> StoreResult<Campaign> {
    let version: i32 = sqlx::query_scalar(
        "UPDATE campaigns SET version = version + 1, name = $3, updated_at = now()
         WHERE tenant_id = $1 AND id = $2 RETURNING version",
    )
    .bind(tenant)
    .bind(id)
    .bind(def.name.trim())
    .fetch_one(&mut *conn)
    .await?;
    insert_version(conn, tenant, id, version, def).await?;
    get(conn, tenant, id)
        .await?
        .ok_or_else(|| campaign_not_found(id))
}

pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Campaign>> {
    let sql = format!("{SELECT} WHERE c.tenant_id = $1 AND c.id = $2");
    let row: Option<CampaignRow> = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(to_campaign).transpose()
}

/// Locks a campaign row for a change of status or definition (NO KEY: journeys referring to
/// it can still be inserted meanwhile).
pub async fn lock(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<CampaignStatus>> {
    Ok(sqlx::query_scalar(
        "SELECT status FROM campaigns WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Campaigns newest first, optionally of one status, before the cursor id.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    status: Option<CampaignStatus>,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Campaign>> {
    let sql = format!(
        "{SELECT} WHERE c.tenant_id = $1 AND ($2::text IS NULL OR c.status = $2)
           AND ($3::uuid IS NULL OR c.id < $3)
         ORDER BY c.id DESC LIMIT $4"
    );
    let rows: Vec<CampaignRow> = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(status)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(to_campaign).collect()
}

/// Moves a campaign to `next`. Archiving exits every running journey, each on its contact's
/// timeline.
pub async fn set_status(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    next: CampaignStatus,
    now: DateTime<Utc>,
) -> StoreResult<Campaign> {
    let current = lock(conn, tenant, id)
        .await?
        .ok_or_else(|| campaign_not_found(id))?;
    use CampaignStatus::*;
    let allowed = matches!(
        (current, next),
        (Draft | Paused | Active, Active)
            | (Active | Paused, Paused)
            | (Draft | Active | Paused | Archived, Archived)
    );
    if !allowed {
        return Err(StoreError::Conflict(format!(
            "a {} campaign cannot become {}",
            current.as_str(),
            next.as_str()
        )));
    }
    if current != next {
        sqlx::query(
            "UPDATE campaigns SET status = $3, updated_at = now(),
                activated_at = CASE WHEN $3 = 'active' THEN coalesce(activated_at, now()) ELSE activated_at END,
                archived_at = CASE WHEN $3 = 'archived' THEN now() ELSE archived_at END
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(id)
        .bind(next)
        .execute(&mut *conn)
        .await?;
    }
    if next == Archived && current != Archived {
        let exited: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
            "UPDATE journeys SET status = 'exited', exit_reason = 'campaign_archived',
                ended_at = $3, wake_at = NULL, updated_at = now()
             WHERE tenant_id = $1 AND campaign_id = $2 AND status = 'active'
             RETURNING id, contact_id, version",
        )
        .bind(tenant)
        .bind(id)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        for (journey, contact, version) in exited {
            events::emit_about(
                conn,
                tenant,
                contact,
                kinds::CAMPAIGN_EXITED,
                json!({"campaign_id": id, "journey_id": journey, "version": version,
                       "reason": "campaign_archived", "converted": false}),
                Some(("journey", journey)),
            )
            .await?;
        }
    }
    get(conn, tenant, id)
        .await?
        .ok_or_else(|| campaign_not_found(id))
}

/// Journeys by state and the campaign's messages by outcome.
pub async fn stats(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<CampaignStats> {
    let (enrolled, active, completed, exited, converted): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'active'),
                    count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'exited'),
                    count(*) FILTER (WHERE converted)
             FROM journeys WHERE tenant_id = $1 AND campaign_id = $2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let rows: Vec<(String, String, Option<String>, i64, i64, i64)> = sqlx::query_as(
        "SELECT channel, status, CASE WHEN status = 'suppressed' THEN status_reason END,
                count(*), count(opened_at), count(clicked_at)
         FROM messages WHERE tenant_id = $1 AND campaign_id = $2
         GROUP BY 1, 2, 3",
    )
    .bind(tenant)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut stats = CampaignStats {
        campaign_id: id,
        enrolled,
        active,
        completed,
        exited,
        converted,
        ..CampaignStats::default()
    };
    let mut sent: BTreeMap<String, i64> = BTreeMap::new();
    for (channel, status, reason, n, opened, clicked) in rows {
        stats.opened += opened;
        stats.clicked += clicked;
        match status.as_str() {
            "sent" | "delivered" => {
                *sent.entry(channel).or_default() += n;
                if status == "delivered" {
                    stats.delivered += n;
                }
            }
            "queued" | "sending" => stats.queued += n,
            "failed" | "dead" => stats.failed += n,
            "suppressed" => {
                let reason = reason.unwrap_or_else(|| "suppressed".to_owned());
                *stats.suppressed.entry(reason).or_default() += n;
            }
            _ => {}
        }
    }
    stats.sent = sent;
    Ok(stats)
}

/// A campaign's journeys newest first, by status and contact, before the id `before`.
pub async fn list_journeys(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
    status: Option<JourneyStatus>,
    contact: Option<Uuid>,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<JourneyView>> {
    Ok(sqlx::query_as(
        "SELECT id, campaign_id, version, contact_id, status, position, wake_at, enrolled_at,
                ended_at, exit_reason, converted, trigger_event_id, last_message_id
         FROM journeys
         WHERE tenant_id = $1 AND campaign_id = $2 AND ($3::text IS NULL OR status = $3)
           AND ($4::uuid IS NULL OR contact_id = $4) AND ($5::uuid IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6",
    )
    .bind(tenant)
    .bind(campaign)
    .bind(status)
    .bind(contact)
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Marketing messages queued for the contact in `(from, to]` (frequency caps).
pub async fn count_marketing_sends(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM marketing_sends
         WHERE tenant_id = $1 AND contact_id = $2 AND sent_at > $3 AND sent_at <= $4",
    )
    .bind(tenant)
    .bind(contact)
    .bind(from)
    .bind(to)
    .fetch_one(conn)
    .await?)
}

/// Counts a queued marketing message against the contact's frequency caps.
pub async fn record_marketing_send(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
    at: DateTime<Utc>,
    message: Uuid,
    campaign: Uuid,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO marketing_sends (tenant_id, contact_id, sent_at, message_id, campaign_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(tenant)
    .bind(contact)
    .bind(at)
    .bind(message)
    .bind(campaign)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`count_marketing_sends`] for many contacts at once: those with any, and how many.
pub async fn count_marketing_sends_many(
    conn: &mut PgConnection,
    tenant: TenantId,
    contacts: &[Uuid],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> StoreResult<HashMap<Uuid, i64>> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT contact_id, count(*) FROM marketing_sends
         WHERE tenant_id = $1 AND contact_id = ANY($2) AND sent_at > $3 AND sent_at <= $4
         GROUP BY contact_id",
    )
    .bind(tenant)
    .bind(contacts)
    .bind(from)
    .bind(to)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Counts a broadcast's queued marketing messages against their contacts' frequency caps,
/// each at the time it is to go: (contact, message, time).
pub async fn record_broadcast_sends(
    conn: &mut PgConnection,
    tenant: TenantId,
    broadcast: Uuid,
    sends: &[(Uuid, Uuid, DateTime<Utc>)],
) -> StoreResult<()> {
    if sends.is_empty() {
        return Ok(());
    }
    let contacts: Vec<Uuid> = sends.iter().map(|s| s.0).collect();
    let messages: Vec<Uuid> = sends.iter().map(|s| s.1).collect();
    let at: Vec<DateTime<Utc>> = sends.iter().map(|s| s.2).collect();
    sqlx::query(
        "INSERT INTO marketing_sends (tenant_id, contact_id, sent_at, message_id, broadcast_id)
         SELECT $1, u.c, u.at, u.m, $2
         FROM unnest($3::uuid[], $4::uuid[], $5::timestamptz[]) AS u(c, m, at)",
    )
    .bind(tenant)
    .bind(broadcast)
    .bind(&contacts)
    .bind(&messages)
    .bind(&at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether `segment` is this tenant's, holding its row (`FOR SHARE`) until the transaction
/// ends: a segment cannot be deleted between this check and the commit of the campaign or
/// broadcast that names it (deleting takes the row `FOR UPDATE`, then counts who names it).
pub async fn hold_segment(
    conn: &mut PgConnection,
    tenant: TenantId,
    segment: Uuid,
) -> StoreResult<bool> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM segments WHERE tenant_id = $1 AND id = $2 FOR SHARE")
            .bind(tenant)
            .bind(segment)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// Checks the segment an `audience` names: it must be this tenant's (held, as above).
pub async fn check_audience(
    conn: &mut PgConnection,
    tenant: TenantId,
    def: &Definition,
) -> StoreResult<()> {
    let Some(segment) = def.audience.as_ref().and_then(|a| a.segment()) else {
        return Ok(());
    };
    if hold_segment(conn, tenant, segment).await? {
        return Ok(());
    }
    Err(StoreError::Invalid(Invalid(vec![FieldError::new(
        "audience.segment",
        format!("no segment with id `{segment}`"),
    )])))
}

/// A segment's condition as it is now (`None`: the segment is gone), for an audience that
/// names it.
pub async fn segment_condition(
    conn: &mut PgConnection,
    tenant: TenantId,
    segment: Uuid,
) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT condition FROM segments WHERE tenant_id = $1 AND id = $2")
            .bind(tenant)
            .bind(segment)
            .fetch_optional(conn)
            .await?,
    )
}

/// A campaign the engine looks at: active, or paused (its journeys still exit).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunningCampaign {
    pub id: Uuid,
    pub status: CampaignStatus,
    /// The current version (new enrolments start on it).
    pub version: i32,
    pub name: String,
}

/// The tenant's active and paused campaigns.
pub async fn running(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> StoreResult<Vec<RunningCampaign>> {
    Ok(sqlx::query_as(
        "SELECT id, status, version, name FROM campaigns
         WHERE tenant_id = $1 AND status IN ('active', 'paused')",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?)
}

/// Every tenant's active campaigns: tenant, id, current version.
pub async fn active_everywhere(conn: &mut PgConnection) -> StoreResult<Vec<(TenantId, Uuid, i32)>> {
    Ok(
        sqlx::query_as("SELECT tenant_id, id, version FROM campaigns WHERE status = 'active'")
            .fetch_all(conn)
            .await?,
    )
}

/// A campaign version's stored definition.
pub async fn version_definition(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
    version: i32,
) -> StoreResult<Value> {
    Ok(sqlx::query_scalar(
        "SELECT definition FROM campaign_versions
         WHERE tenant_id = $1 AND campaign_id = $2 AND version = $3",
    )
    .bind(tenant)
    .bind(campaign)
    .bind(version)
    .fetch_one(conn)
    .await?)
}

/// Records that a scheduled occurrence (`birthday:2026`) of a campaign was looked at for a
/// contact, so it is looked at once.
pub async fn mark_occurrence(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
    contact: Uuid,
    occurrence: &str,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO schedule_marks (tenant_id, campaign_id, contact_id, occurrence)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(campaign)
    .bind(contact)
    .bind(occurrence)
    .execute(conn)
    .await?;
    Ok(())
}

/// The contacts whose birthday is today in their time zone (29 February kept on 28 February in
/// other years), whose local time has passed `at`, and who were not looked at for this year's
/// occurrence of the campaign yet: contact, year. At most 1,000 per call.
pub async fn birthdays_due(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
    now: DateTime<Utc>,
    at: chrono::NaiveTime,
) -> StoreResult<Vec<(Uuid, i32)>> {
    Ok(sqlx::query_as(
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
    .fetch_all(conn)
    .await?)
}
