//! SQL for events and the per-contact counters.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::Event;
use crate::tenancy::TenantId;

const EVENT_COLUMNS: &str = "id, type, contact_id, occurred_at, received_at, properties, source,
    ordinal, idempotency_key, subject_type, subject_id";

/// An event to append to a contact's timeline.
#[derive(Debug, Clone)]
pub struct NewEventRow<'a> {
    pub id: Uuid,
    pub contact_id: Uuid,
    pub kind: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub properties: &'a Value,
    pub source: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub subject: Option<(&'a str, Uuid)>,
}

/// An appended event: its id and its ordinal among the contact's events of that type.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub id: Uuid,
    pub ordinal: i64,
}

/// Appends an event and bumps the contact's counter for its type, in one statement. The
/// counter's row lock orders concurrent events of one contact and type, so ordinals are exact.
/// While the tenant has a running campaign, the same statement puts the event in the rule
/// engine's inbox (Rapport's own `campaign.*` decisions are not triggers).
/// None when an event with the same idempotency key exists (the counter is left as it was).
pub async fn append(
    conn: &mut PgConnection,
    tenant: TenantId,
    e: &NewEventRow<'_>,
) -> Result<Option<Appended>, sqlx::Error> {
    let ordinal: Option<i64> = sqlx::query_scalar(
        "WITH counter AS (
            INSERT INTO contact_event_counts AS c (tenant_id, contact_id, event_type, count)
            VALUES ($1, $3, $4, 1)
            ON CONFLICT (tenant_id, contact_id, event_type)
            DO UPDATE SET count = c.count + 1
            RETURNING count
         )
         , appended AS (
            INSERT INTO events (tenant_id, id, contact_id, type, occurred_at, properties, source,
                                ordinal, idempotency_key, subject_type, subject_id)
            SELECT $1, $2, $3, $4, $5, $6, $7, counter.count, $8, $9, $10 FROM counter
            ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
            RETURNING id, ordinal
         )
         , inbox AS (
            INSERT INTO campaign_inbox (tenant_id, contact_id, event_id)
            SELECT $1, $3, appended.id FROM appended
            WHERE left($4, 9) <> 'campaign.'
              AND EXISTS (SELECT 1 FROM campaigns WHERE tenant_id = $1
                          AND status IN ('active', 'paused'))
         )
         SELECT ordinal FROM appended",
    )
    .bind(tenant)
    .bind(e.id)
    .bind(e.contact_id)
    .bind(e.kind)
    .bind(e.occurred_at)
    .bind(e.properties)
    .bind(e.source)
    .bind(e.idempotency_key)
    .bind(e.subject.map(|s| s.0))
    .bind(e.subject.map(|s| s.1))
    .fetch_optional(&mut *conn)
    .await?;
    match ordinal {
        Some(ordinal) => Ok(Some(Appended { id: e.id, ordinal })),
        None => {
            // A concurrent request recorded the same idempotency key first: undo our bump. We
            // still hold the counter's lock, so nobody saw the bumped value.
            sqlx::query(
                "UPDATE contact_event_counts SET count = count - 1
                 WHERE tenant_id = $1 AND contact_id = $2 AND event_type = $3",
            )
            .bind(tenant)
            .bind(e.contact_id)
            .bind(e.kind)
            .execute(conn)
            .await?;
            Ok(None)
        }
    }
}

/// An event Rapport emits, for [`append_many`].
#[derive(Debug, Clone)]
pub struct Emitted {
    pub tenant: TenantId,
    pub contact_id: Uuid,
    pub kind: &'static str,
    pub properties: Value,
    pub subject: Option<(&'static str, Uuid)>,
}

/// Appends many events Rapport emits in one statement (the outbox records a batch of sends
/// this way). Counters are bumped once per contact and type, in a sorted order so that
/// concurrent batches cannot deadlock, and each event gets its exact ordinal. Like
/// [`append`], it feeds the rule engine's inbox while the tenant has a running campaign.
pub async fn append_many(conn: &mut PgConnection, rows: &[Emitted]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let tenants: Vec<Uuid> = rows.iter().map(|r| r.tenant.0).collect();
    let ids: Vec<Uuid> = rows.iter().map(|_| Uuid::now_v7()).collect();
    let contacts: Vec<Uuid> = rows.iter().map(|r| r.contact_id).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
    let properties: Vec<&Value> = rows.iter().map(|r| &r.properties).collect();
    let subject_types: Vec<Option<&str>> = rows.iter().map(|r| r.subject.map(|s| s.0)).collect();
    let subject_ids: Vec<Option<Uuid>> = rows.iter().map(|r| r.subject.map(|s| s.1)).collect();
    let appended: i64 = sqlx::query_scalar(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[],
                                 $6::text[], $7::uuid[])
                   WITH ORDINALITY AS u(t, id, c, k, p, st, sid, n)
         ), numbered AS (
            SELECT input.*,
                   row_number() OVER (PARTITION BY t, c, k ORDER BY n) AS rn,
                   count(*) OVER (PARTITION BY t, c, k) AS total
            FROM input
         ), counters AS (
            INSERT INTO contact_event_counts AS cc (tenant_id, contact_id, event_type, count)
            SELECT t, c, k, count(*) FROM input GROUP BY t, c, k ORDER BY t, c, k
            ON CONFLICT (tenant_id, contact_id, event_type)
            DO UPDATE SET count = cc.count + excluded.count
            RETURNING tenant_id, contact_id, event_type, count
         ), appended AS (
            INSERT INTO events (tenant_id, id, contact_id, type, occurred_at, properties, source,
                                ordinal, subject_type, subject_id)
            SELECT x.t, x.id, x.c, x.k, clock_timestamp(), x.p, 'rapport',
                   cn.count - x.total + x.rn, x.st, x.sid
            FROM numbered x JOIN counters cn
              ON cn.tenant_id = x.t AND cn.contact_id = x.c AND cn.event_type = x.k
            ORDER BY x.n
            RETURNING tenant_id, id, contact_id, type
         ), inbox AS (
            INSERT INTO campaign_inbox (tenant_id, contact_id, event_id)
            SELECT a.tenant_id, a.contact_id, a.id FROM appended a JOIN input i ON i.id = a.id
            WHERE left(a.type, 9) <> 'campaign.'
              AND EXISTS (SELECT 1 FROM campaigns cp WHERE cp.tenant_id = a.tenant_id
                          AND cp.status IN ('active', 'paused'))
            ORDER BY i.n
         )
         SELECT count(*) FROM appended",
    )
    .bind(&tenants)
    .bind(&ids)
    .bind(&contacts)
    .bind(&kinds)
    .bind(&properties)
    .bind(&subject_types)
    .bind(&subject_ids)
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(appended).unwrap_or(0))
}

/// Appends an event Rapport emits itself (`contact.updated`, `message.sent`...).
pub async fn emit(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Uuid,
    kind: &str,
    properties: Value,
) -> Result<Appended, sqlx::Error> {
    emit_about(conn, tenant, contact_id, kind, properties, None).await
}

/// [`emit`] for an event about an object (a message, a ticket...), linked for the timeline.
pub async fn emit_about(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Uuid,
    kind: &str,
    properties: Value,
    subject: Option<(&str, Uuid)>,
) -> Result<Appended, sqlx::Error> {
    let row = NewEventRow {
        id: Uuid::now_v7(),
        contact_id,
        kind,
        occurred_at: Utc::now(),
        properties: &properties,
        source: "rapport",
        idempotency_key: None,
        subject,
    };
    append(conn, tenant, &row).await?.ok_or_else(|| {
        sqlx::Error::Protocol("event without idempotency key was deduplicated".into())
    })
}

/// [`emit_about`] for a fact that happened at `occurred_at` (a call's own times), so the
/// timeline is the same whatever order the facts arrived in.
pub async fn emit_about_at(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Uuid,
    kind: &str,
    properties: Value,
    subject: Option<(&str, Uuid)>,
    occurred_at: DateTime<Utc>,
) -> Result<Appended, sqlx::Error> {
    let row = NewEventRow {
        id: Uuid::now_v7(),
        contact_id,
        kind,
        occurred_at,
        properties: &properties,
        source: "rapport",
        idempotency_key: None,
        subject,
    };
    append(conn, tenant, &row).await?.ok_or_else(|| {
        sqlx::Error::Protocol("event without idempotency key was deduplicated".into())
    })
}

/// The events already recorded under these idempotency keys: key -> (id, contact, ordinal).
pub async fn by_idempotency_keys(
    conn: &mut PgConnection,
    tenant: TenantId,
    keys: &[String],
) -> Result<HashMap<String, (Uuid, Uuid, i64)>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT idempotency_key, id, contact_id, ordinal FROM events
         WHERE tenant_id = $1 AND idempotency_key = ANY($2)",
    )
    .bind(tenant)
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(k, id, contact, ordinal)| (k, (id, contact, ordinal)))
        .collect())
}

/// An event of a live contact.
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events e
         WHERE e.tenant_id = $1 AND e.id = $2
           AND EXISTS (SELECT 1 FROM contacts c WHERE c.tenant_id = e.tenant_id
                       AND c.id = e.contact_id AND c.erased_at IS NULL)"
    );
    sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// A contact's events, newest first (by when they happened), before the cursor.
pub async fn timeline(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Uuid,
    kind: Option<&str>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE tenant_id = $1 AND contact_id = $2
           AND ($3::text IS NULL OR type = $3)
           AND ($4::timestamptz IS NULL OR (occurred_at, id) < ($4, $5))
         ORDER BY occurred_at DESC, id DESC LIMIT $6"
    );
    sqlx::query_as(&sql)
        .bind(tenant)
        .bind(contact_id)
        .bind(kind)
        .bind(before.map(|b| b.0))
        .bind(before.map(|b| b.1).unwrap_or_default())
        .bind(limit + 1)
        .fetch_all(conn)
        .await
}

/// The events about one object (a message, a ticket...), oldest first.
pub async fn about(
    conn: &mut PgConnection,
    tenant: TenantId,
    subject_type: &str,
    subject_id: Uuid,
) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE tenant_id = $1 AND subject_type = $2 AND subject_id = $3
         ORDER BY occurred_at, id"
    );
    sqlx::query_as(&sql)
        .bind(tenant)
        .bind(subject_type)
        .bind(subject_id)
        .fetch_all(conn)
        .await
}
