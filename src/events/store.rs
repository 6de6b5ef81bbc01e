//! SQL for events and the per-contact counters.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::Event;
use crate::domain::TenantId;

pub(crate) const EVENT_COLUMNS: &str =
    "id, type, contact_id, occurred_at, received_at, properties, source,
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

/// Appends an event and bumps the contact's counter for its type (see [`append_all`]).
pub async fn append(
    conn: &mut PgConnection,
    tenant: TenantId,
    e: &NewEventRow<'_>,
) -> Result<Appended, sqlx::Error> {
    append_all(conn, tenant, std::slice::from_ref(e))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| sqlx::Error::Protocol("the event was not appended".into()))
}

/// Appends a tenant's events in one statement and bumps the contacts' counters, so each event
/// gets its exact ordinal among the contact's events of its type (in slice order). Counter
/// rows are locked in (contact, type) order, so concurrent appends cannot deadlock. While the
/// tenant has a running campaign, the same statement puts the events in the rule engine's
/// inbox (Rapport's own `campaign.*` decisions are not triggers).
///
/// An idempotency key already recorded is a unique violation; callers that pass keys hold
/// [`lock_idempotency_keys`] and look them up first, so that cannot happen under them.
pub async fn append_all(
    conn: &mut PgConnection,
    tenant: TenantId,
    rows: &[NewEventRow<'_>],
) -> Result<Vec<Appended>, sqlx::Error> {
    let mut columns = Columns::with_capacity(rows.len());
    for r in rows {
        columns.push(EventRow {
            tenant,
            id: r.id,
            contact: ContactKey::Id(r.contact_id),
            kind: r.kind,
            occurred_at: Some(r.occurred_at),
            properties: r.properties,
            source: r.source,
            idempotency_key: r.idempotency_key,
            subject: r.subject,
        });
    }
    let appended = columns.insert(conn).await?;
    Ok(appended
        .into_iter()
        .map(|(id, _, ordinal)| Appended { id, ordinal })
        .collect())
}

/// An event of a known contact named by the tenant's external id, for [`append_known`].
#[derive(Debug, Clone, Copy)]
pub struct ByExternalId<'a> {
    pub tenant: TenantId,
    pub external_id: &'a str,
    pub kind: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub properties: &'a Value,
}

/// Appends events of contacts named by external id, of any tenants, in one statement that
/// also finds the contacts: the fast path of ingestion, one round trip and no transaction
/// around it. All or nothing: when a contact does not exist (yet), nothing is appended and
/// the answer is None. Otherwise (id, contact, ordinal) of each event, in slice order.
pub async fn append_known(
    conn: &mut PgConnection,
    rows: &[ByExternalId<'_>],
) -> Result<Option<Vec<(Uuid, Uuid, i64)>>, sqlx::Error> {
    let mut columns = Columns::with_capacity(rows.len());
    for r in rows {
        columns.push(EventRow {
            tenant: r.tenant,
            id: Uuid::now_v7(),
            contact: ContactKey::External(r.external_id),
            kind: r.kind,
            occurred_at: Some(r.occurred_at),
            properties: r.properties,
            source: "api",
            idempotency_key: None,
            subject: None,
        });
    }
    let appended = columns.insert(conn).await?;
    Ok((appended.len() == rows.len()).then_some(appended))
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

/// Appends many events Rapport emits, of any tenants, in one statement (the outbox records a
/// batch of sends this way), like [`append_all`]. They happen now, in slice order.
pub async fn append_many(conn: &mut PgConnection, rows: &[Emitted]) -> Result<u64, sqlx::Error> {
    let mut columns = Columns::with_capacity(rows.len());
    for r in rows {
        columns.push(EventRow {
            tenant: r.tenant,
            id: Uuid::now_v7(),
            contact: ContactKey::Id(r.contact_id),
            kind: r.kind,
            occurred_at: None,
            properties: &r.properties,
            source: "rapport",
            idempotency_key: None,
            subject: r.subject,
        });
    }
    columns.insert_by_id(conn).await
}

/// How an event to append names its contact.
enum ContactKey<'a> {
    Id(Uuid),
    /// Found by the statement itself; the contact must exist.
    External(&'a str),
}

/// One event to append.
struct EventRow<'a> {
    tenant: TenantId,
    id: Uuid,
    contact: ContactKey<'a>,
    kind: &'a str,
    /// None: the time of the insert, row by row (`clock_timestamp()`), so events emitted
    /// together keep their order on the timeline.
    occurred_at: Option<DateTime<Utc>>,
    properties: &'a Value,
    source: &'a str,
    idempotency_key: Option<&'a str>,
    subject: Option<(&'a str, Uuid)>,
}

/// Events to append, as one array per column (what one `unnest` statement takes).
struct Columns<'a> {
    tenant: Vec<Uuid>,
    id: Vec<Uuid>,
    contact: Vec<Option<Uuid>>,
    external_id: Vec<Option<&'a str>>,
    kind: Vec<&'a str>,
    occurred_at: Vec<Option<DateTime<Utc>>>,
    properties: Vec<&'a Value>,
    source: Vec<&'a str>,
    idempotency_key: Vec<Option<&'a str>>,
    subject_type: Vec<Option<&'a str>>,
    subject_id: Vec<Option<Uuid>>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Columns {
            tenant: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            contact: Vec::with_capacity(n),
            external_id: Vec::with_capacity(n),
            kind: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            properties: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            idempotency_key: Vec::with_capacity(n),
            subject_type: Vec::with_capacity(n),
            subject_id: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, r: EventRow<'a>) {
        self.tenant.push(r.tenant.0);
        self.id.push(r.id);
        let (contact, external_id) = match r.contact {
            ContactKey::Id(id) => (Some(id), None),
            ContactKey::External(x) => (None, Some(x)),
        };
        self.contact.push(contact);
        self.external_id.push(external_id);
        self.kind.push(r.kind);
        self.occurred_at.push(r.occurred_at);
        self.properties.push(r.properties);
        self.source.push(r.source);
        self.idempotency_key.push(r.idempotency_key);
        self.subject_type.push(r.subject.map(|s| s.0));
        self.subject_id.push(r.subject.map(|s| s.1));
    }

    /// The position of each event among the events of its contact and type in this slice,
    /// how many there are (the statement turns them into exact ordinals), and when the latest
    /// of them happened (now for those that happen now), for the counter's `last_at`.
    fn numbering(&self) -> (Vec<i64>, Vec<i64>, Vec<DateTime<Utc>>) {
        // Every caller names all the contacts of a statement one way (by id, or by external id
        // in `append_known`), so equal keys are equal contacts.
        let key = |i: usize| {
            (
                self.tenant[i],
                self.contact[i],
                self.external_id[i],
                self.kind[i],
            )
        };
        // One look-up per row: each distinct key gets a slot, counted as its rows go by, and
        // the totals are read back by slot.
        let now = Utc::now();
        let mut slots = HashMap::with_capacity(self.id.len());
        let mut counts: Vec<i64> = Vec::with_capacity(self.id.len());
        let mut latest: Vec<DateTime<Utc>> = Vec::with_capacity(self.id.len());
        let mut slot_of = Vec::with_capacity(self.id.len());
        let position: Vec<i64> = (0..self.id.len())
            .map(|i| {
                let slot = *slots.entry(key(i)).or_insert_with(|| {
                    counts.push(0);
                    latest.push(DateTime::<Utc>::MIN_UTC);
                    counts.len() - 1
                });
                slot_of.push(slot);
                counts[slot] += 1;
                latest[slot] = latest[slot].max(self.occurred_at[i].unwrap_or(now));
                counts[slot]
            })
            .collect();
        let total = slot_of.iter().map(|&s| counts[s]).collect();
        let last = slot_of.iter().map(|&s| latest[s]).collect();
        (position, total, last)
    }

    /// The one statement that appends events: (id, contact, ordinal) of each appended, in
    /// input order. Nothing at all when a contact named by external id is missing.
    ///
    /// The counter of each (contact, type) is bumped once by the number of its events here
    /// (from the row that is its first), in key order so concurrent statements cannot
    /// deadlock; each event's ordinal is the new count less the events after it.
    ///
    /// When a contact is missing, the counters' one-time check leaves them empty, so the join
    /// appends nothing. The inbox's join is not even built while the tenants have no running
    /// campaign (`running` is read once, for that check and for each event's tenant). The
    /// rows come back as inserted and are put in input order here, by id, rather than by
    /// joining the input once more. When the inbox got rows, the process's inbox bell rings
    /// ([`super::inbox`]), so an idle engine looks at once.
    async fn insert(self, conn: &mut PgConnection) -> Result<Vec<(Uuid, Uuid, i64)>, sqlx::Error> {
        if self.id.is_empty() {
            return Ok(Vec::new());
        }
        let (position, total, last) = self.numbering();
        let appended: Vec<(Uuid, Uuid, i64, bool)> = sqlx::query_as(
            "WITH input AS (
                SELECT u.t, u.id, coalesce(u.c, (SELECT ct.id FROM contacts ct
                                                 WHERE ct.tenant_id = u.t
                                                   AND ct.external_id = u.x)) AS c,
                       u.k, u.at, u.p, u.src, u.ik, u.st, u.sid, u.rn, u.total, u.last, u.n
                FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                            $6::timestamptz[], $7::jsonb[], $8::text[], $9::text[],
                            $10::text[], $11::uuid[], $12::int8[], $13::int8[],
                            $14::timestamptz[])
                     WITH ORDINALITY AS u(t, id, c, x, k, at, p, src, ik, st, sid, rn, total,
                                          last, n)
             ), counters AS (
                INSERT INTO contact_event_counts AS cc
                    (tenant_id, contact_id, event_type, count, last_at)
                SELECT t, c, k, total, last FROM input
                WHERE rn = 1 AND NOT EXISTS (SELECT 1 FROM input missing WHERE missing.c IS NULL)
                ORDER BY t, c, k
                ON CONFLICT (tenant_id, contact_id, event_type)
                DO UPDATE SET count = cc.count + excluded.count,
                              last_at = greatest(cc.last_at, excluded.last_at)
                RETURNING tenant_id, contact_id, event_type, count
             ), appended AS (
                INSERT INTO events (tenant_id, id, contact_id, type, occurred_at, properties,
                                    source, ordinal, idempotency_key, subject_type, subject_id)
                SELECT x.t, x.id, x.c, x.k, coalesce(x.at, clock_timestamp()), x.p, x.src,
                       cn.count - x.total + x.rn, x.ik, x.st, x.sid
                FROM input x JOIN counters cn
                  ON cn.tenant_id = x.t AND cn.contact_id = x.c AND cn.event_type = x.k
                ORDER BY x.n
                RETURNING tenant_id, id, contact_id, type, ordinal
             ), running AS (
                SELECT DISTINCT cp.tenant_id FROM campaigns cp
                WHERE cp.tenant_id = ANY($1) AND cp.status IN ('active', 'paused')
             ), inbox AS (
                INSERT INTO campaign_inbox (tenant_id, contact_id, event_id)
                SELECT a.tenant_id, a.contact_id, a.id FROM appended a JOIN input i ON i.id = a.id
                WHERE EXISTS (SELECT 1 FROM running)
                  AND left(a.type, 9) <> 'campaign.'
                  AND a.tenant_id IN (SELECT tenant_id FROM running)
                ORDER BY i.n
                RETURNING 1
             )
             SELECT id, contact_id, ordinal, EXISTS (SELECT 1 FROM inbox) FROM appended",
        )
        .bind(&self.tenant)
        .bind(&self.id)
        .bind(&self.contact)
        .bind(&self.external_id)
        .bind(&self.kind)
        .bind(&self.occurred_at)
        .bind(&self.properties)
        .bind(&self.source)
        .bind(&self.idempotency_key)
        .bind(&self.subject_type)
        .bind(&self.subject_id)
        .bind(&position)
        .bind(&total)
        .bind(&last)
        .fetch_all(conn)
        .await?;
        if appended.first().is_some_and(|a| a.3) {
            super::inbox::ring();
        }
        let appended = appended
            .into_iter()
            .map(|(id, c, n, _)| (id, c, n))
            .collect();
        Ok(in_input_order(&self.id, appended))
    }

    /// [`Columns::insert`] for events whose contacts are all named by id and whose ids were
    /// made by [`Uuid::now_v7`] in slice order, when nothing is asked back but how many: the
    /// same counters, ordinals and inbox, without carrying the input through the statement
    /// to check contacts and to answer in input order (about a third of the statement's time
    /// for the rule engine's thousands of decisions a transaction).
    async fn insert_by_id(self, conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
        if self.id.is_empty() {
            return Ok(0);
        }
        debug_assert!(self.contact.iter().all(Option::is_some));
        let (position, total, last) = self.numbering();
        let (done, inboxed): (i64, bool) = sqlx::query_as(
            "WITH counters AS (
                INSERT INTO contact_event_counts AS cc
                    (tenant_id, contact_id, event_type, count, last_at)
                SELECT t, c, k, total, last
                FROM unnest($1::uuid[], $3::uuid[], $4::text[], $10::int8[], $11::int8[],
                            $12::timestamptz[])
                     AS u(t, c, k, rn, total, last)
                WHERE rn = 1 ORDER BY t, c, k
                ON CONFLICT (tenant_id, contact_id, event_type)
                DO UPDATE SET count = cc.count + excluded.count,
                              last_at = greatest(cc.last_at, excluded.last_at)
                RETURNING tenant_id, contact_id, event_type, count
             ), appended AS (
                INSERT INTO events (tenant_id, id, contact_id, type, occurred_at, properties,
                                    source, ordinal, subject_type, subject_id)
                SELECT u.t, u.id, u.c, u.k, coalesce(u.at, clock_timestamp()), u.p, u.src,
                       cn.count - u.total + u.rn, u.st, u.sid
                FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
                            $6::jsonb[], $7::text[], $8::text[], $9::uuid[], $10::int8[],
                            $11::int8[])
                     WITH ORDINALITY AS u(t, id, c, k, at, p, src, st, sid, rn, total, n)
                JOIN counters cn
                  ON cn.tenant_id = u.t AND cn.contact_id = u.c AND cn.event_type = u.k
                ORDER BY u.n
                RETURNING tenant_id, id, contact_id, type
             ), inbox AS (
                INSERT INTO campaign_inbox (tenant_id, contact_id, event_id)
                SELECT a.tenant_id, a.contact_id, a.id FROM appended a
                WHERE left(a.type, 9) <> 'campaign.'
                  AND a.tenant_id IN (SELECT cp.tenant_id FROM campaigns cp
                                      WHERE cp.tenant_id = ANY($1)
                                        AND cp.status IN ('active', 'paused'))
                ORDER BY a.id
                RETURNING 1
             )
             SELECT count(*), EXISTS (SELECT 1 FROM inbox) FROM appended",
        )
        .bind(&self.tenant)
        .bind(&self.id)
        .bind(&self.contact)
        .bind(&self.kind)
        .bind(&self.occurred_at)
        .bind(&self.properties)
        .bind(&self.source)
        .bind(&self.subject_type)
        .bind(&self.subject_id)
        .bind(&position)
        .bind(&total)
        .bind(&last)
        .fetch_one(conn)
        .await?;
        if inboxed {
            super::inbox::ring();
        }
        Ok(done as u64)
    }
}

/// Appended rows `(id, ..)` in the order of `ids` (inserted in that order, they usually come
/// back so: then no map is built).
fn in_input_order<T>(ids: &[Uuid], mut rows: Vec<(Uuid, Uuid, T)>) -> Vec<(Uuid, Uuid, T)> {
    if rows.iter().map(|r| r.0).eq(ids.iter().copied()) {
        return rows;
    }
    let position: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    rows.sort_by_key(|r| position.get(&r.0).copied().unwrap_or(usize::MAX));
    rows
}

/// Takes a transaction-scoped lock on each of a tenant's event idempotency keys (in one
/// order, so concurrent requests cannot deadlock), so that looking a key up and recording it cannot be
/// raced by another request with the same key.
pub async fn lock_idempotency_keys(
    conn: &mut PgConnection,
    tenant: TenantId,
    keys: &[&str],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    // Locked in the order of the lock keys themselves, whatever keys hash alike.
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, h)
         FROM (SELECT DISTINCT hashtext($2::text || k) AS h FROM unnest($3::text[]) AS u(k)
               ORDER BY h) locks",
    )
    .bind(IDEMPOTENCY_LOCK_CLASS)
    .bind(tenant.0.to_string())
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// The first key of the advisory locks on event idempotency keys (the second is a hash).
const IDEMPOTENCY_LOCK_CLASS: i32 = 7401;

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
    append(conn, tenant, &row).await
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
    append(conn, tenant, &row).await
}

/// The events already recorded under these idempotency keys: key -> (id, contact, ordinal).
pub async fn by_idempotency_keys(
    conn: &mut PgConnection,
    tenant: TenantId,
    keys: &[&str],
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

/// The events about a message (sent, delivered, opened...), oldest first, through the
/// `events_about_message` index (its condition is written out so every plan can use it).
pub async fn about_message(
    conn: &mut PgConnection,
    tenant: TenantId,
    message_id: Uuid,
) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE tenant_id = $1 AND subject_type = 'message' AND subject_id = $2
         ORDER BY occurred_at, id"
    );
    sqlx::query_as(&sql)
        .bind(tenant)
        .bind(message_id)
        .fetch_all(conn)
        .await
}

/// Erasure: the contact's events keep their type and time (so counts add up) and lose their
/// properties.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE events SET properties = '{}' WHERE tenant_id = $1 AND contact_id = $2")
        .bind(tenant)
        .bind(contact)
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_rows_are_put_in_input_order() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let contact = Uuid::now_v7();
        let row = |i: usize| (ids[i], contact, i as i64);
        let in_order = vec![row(0), row(1), row(2), row(3)];
        assert_eq!(in_input_order(&ids, in_order.clone()), in_order);
        let shuffled = vec![row(2), row(0), row(3), row(1)];
        assert_eq!(in_input_order(&ids, shuffled), in_order);
        assert!(in_input_order(&ids, Vec::<(Uuid, Uuid, i64)>::new()).is_empty());
    }

    #[test]
    fn numbering_counts_each_contact_and_type_in_slice_order() {
        let tenant = TenantId(Uuid::now_v7());
        let (ana, ivo) = (Uuid::now_v7(), Uuid::now_v7());
        let properties = Value::Null;
        let mut columns = Columns::with_capacity(6);
        for (contact, kind) in [
            (ana, "purchase"),
            (ivo, "purchase"),
            (ana, "purchase"),
            (ana, "cart"),
            (ana, "purchase"),
            (ivo, "cart"),
        ] {
            columns.push(EventRow {
                tenant,
                id: Uuid::now_v7(),
                contact: ContactKey::Id(contact),
                kind,
                occurred_at: None,
                properties: &properties,
                source: "api",
                idempotency_key: None,
                subject: None,
            });
        }
        let (position, total, _) = columns.numbering();
        assert_eq!(position, vec![1, 1, 2, 1, 3, 1]);
        assert_eq!(total, vec![3, 1, 3, 1, 3, 1]);
    }
}
