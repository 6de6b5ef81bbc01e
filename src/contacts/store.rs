//! SQL for contacts. Every write that changes a contact also puts an event on its timeline
//! (`contact.created`, `contact.updated` with old and new values) in the same transaction.

use std::collections::HashMap;

use chrono::Utc;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{Contact, ContactChanges, ContactFields, change};
use crate::domain::{Channel, ConsentStatus, Patch, Purpose, kinds};
use crate::domain::{TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::validate;

/// The columns of [`Contact`], with `stats` gathered from the per-type counters.
/// The columns of [`Contact`] on `contacts c`; other stores' read models select them too.
pub const CONTACT_COLUMNS: &str = "c.id, c.external_id, c.email, c.phone, c.viber_id, c.first_name,
    c.last_name, c.locale, c.country, c.timezone, c.birthday, c.owner_agent_id, c.attributes,
    c.consents,
    (SELECT coalesce(jsonb_object_agg(s.event_type, s.count), '{}'::jsonb)
       FROM contact_event_counts s
      WHERE s.tenant_id = c.tenant_id AND s.contact_id = c.id) AS stats,
    c.created_at, c.updated_at";

const FIELD_COLUMNS: &str = "email, phone, viber_id, first_name, last_name, locale, country,
    timezone, birthday, owner_agent_id, attributes, consents";

/// A live (not erased) contact.
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Contact>> {
    let sql = format!(
        "SELECT {CONTACT_COLUMNS} FROM contacts c
         WHERE c.tenant_id = $1 AND c.id = $2 AND c.erased_at IS NULL"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// The live contacts among these ids, in one query.
pub async fn get_many(
    conn: &mut PgConnection,
    tenant: TenantId,
    ids: &[Uuid],
) -> StoreResult<Vec<Contact>> {
    let sql = format!(
        "SELECT {CONTACT_COLUMNS} FROM contacts c
         WHERE c.tenant_id = $1 AND c.id = ANY($2) AND c.erased_at IS NULL"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(ids)
        .fetch_all(conn)
        .await?)
}

/// Filters of a contact list, already normalised.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub external_id: Option<String>,
}

/// Live contacts newest first, before the cursor id.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &ListFilter,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Contact>> {
    let sql = format!(
        "SELECT {CONTACT_COLUMNS} FROM contacts c
         WHERE c.tenant_id = $1 AND c.erased_at IS NULL
           AND ($2::text IS NULL OR c.email = $2)
           AND ($3::text IS NULL OR c.phone = $3)
           AND ($4::text IS NULL OR c.external_id = $4)
           AND ($5::uuid IS NULL OR c.id < $5)
         ORDER BY c.id DESC LIMIT $6"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(&filter.email)
        .bind(&filter.phone)
        .bind(&filter.external_id)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

/// What an upsert did.
#[derive(Debug)]
pub enum Upserted {
    Created(Contact),
    Updated(Contact),
    Unchanged(Contact),
}

/// Creates or updates the contact with this external id. Validation errors (a phone number
/// that is invalid in the contact's country) come before any write, so a caller can continue
/// the transaction with other work.
pub async fn upsert(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    external_id: &str,
    changes: &ContactChanges,
    field_prefix: &str,
) -> StoreResult<Upserted> {
    if let Patch::Value(agent) = changes.owner_agent_id {
        // Another tenant's agent is as unknown here as one that does not exist.
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2)",
        )
        .bind(tenant.id)
        .bind(agent)
        .fetch_one(&mut *conn)
        .await?;
        if !known {
            return Err(StoreError::field(
                format!("{field_prefix}owner_agent_id"),
                format!("no agent with id {agent}"),
            ));
        }
    }
    for _ in 0..3 {
        let sql = format!(
            "SELECT id, {FIELD_COLUMNS} FROM contacts
             WHERE tenant_id = $1 AND external_id = $2 AND erased_at IS NULL FOR UPDATE"
        );
        let row: Option<IdAndFields> = sqlx::query_as(&sql)
            .bind(tenant.id)
            .bind(external_id)
            .fetch_optional(&mut *conn)
            .await?;
        match row {
            Some(IdAndFields { id, fields }) => {
                let next = merge(tenant, &fields, changes, field_prefix)?;
                if next == fields {
                    return Ok(Upserted::Unchanged(must_get(conn, tenant.id, id).await?));
                }
                let diff = diff(&fields, &next);
                write_fields(conn, tenant.id, id, &next).await?;
                events::emit(
                    conn,
                    tenant.id,
                    id,
                    kinds::CONTACT_UPDATED,
                    json!({"changes": diff}),
                )
                .await?;
                return Ok(Upserted::Updated(must_get(conn, tenant.id, id).await?));
            }
            None => {
                let next = merge(tenant, &ContactFields::empty(), changes, field_prefix)?;
                let id = Uuid::now_v7();
                if insert(conn, tenant.id, id, external_id, &next).await? {
                    events::emit(
                        conn,
                        tenant.id,
                        id,
                        kinds::CONTACT_CREATED,
                        json!({"via": "upsert"}),
                    )
                    .await?;
                    return Ok(Upserted::Created(must_get(conn, tenant.id, id).await?));
                }
                // A concurrent request created it first; update that one.
            }
        }
    }
    Err(StoreError::Unavailable(
        "the contact is being changed by concurrent requests; retry".to_owned(),
    ))
}

#[derive(sqlx::FromRow)]
struct IdAndFields {
    id: Uuid,
    #[sqlx(flatten)]
    fields: ContactFields,
}

impl ContactFields {
    fn empty() -> Self {
        ContactFields {
            attributes: Value::Object(Map::new()),
            ..Default::default()
        }
    }
}

async fn must_get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> StoreResult<Contact> {
    get(conn, tenant, id).await?.ok_or_else(|| {
        StoreError::Internal(anyhow::anyhow!("contact {id} vanished in its transaction"))
    })
}

/// Inserts a contact; false when the external id is taken (by a concurrent request).
async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    external_id: &str,
    f: &ContactFields,
) -> StoreResult<bool> {
    let insert = sqlx::query(
        "INSERT INTO contacts (tenant_id, id, email, phone, viber_id, first_name, last_name,
            locale, country, timezone, birthday, owner_agent_id, attributes, consents, external_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (tenant_id, external_id) DO NOTHING",
    );
    let done = bind_fields(insert.bind(tenant).bind(id), f)
        .bind(external_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn write_fields(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    f: &ContactFields,
) -> StoreResult<()> {
    let update = sqlx::query(
        "UPDATE contacts SET email = $3, phone = $4, viber_id = $5, first_name = $6,
            last_name = $7, locale = $8, country = $9, timezone = $10, birthday = $11,
            owner_agent_id = $12, attributes = $13, consents = $14, updated_at = now()
         WHERE tenant_id = $1 AND id = $2",
    );
    bind_fields(update.bind(tenant).bind(id), f)
        .execute(conn)
        .await?;
    Ok(())
}

/// Binds the writable fields, in [`FIELD_COLUMNS`] order, as the next twelve parameters.
fn bind_fields<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q ContactFields,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&f.email)
        .bind(&f.phone)
        .bind(&f.viber_id)
        .bind(&f.first_name)
        .bind(&f.last_name)
        .bind(&f.locale)
        .bind(&f.country)
        .bind(&f.timezone)
        .bind(f.birthday)
        .bind(f.owner_agent_id)
        .bind(&f.attributes)
        .bind(sqlx::types::Json(&f.consents))
}

/// The fields after applying `changes` to `current`; the phone is normalised with the
/// resulting country, else the tenant's.
fn merge(
    tenant: &TenantContext,
    current: &ContactFields,
    changes: &ContactChanges,
    field_prefix: &str,
) -> StoreResult<ContactFields> {
    let country = changes.country.apply(current.country.clone());
    let phone = match &changes.phone {
        Patch::Value(raw) => {
            let region = country.as_deref().unwrap_or(&tenant.default_country);
            Some(
                validate::phone(raw, Some(region))
                    .map_err(|m| StoreError::field(format!("{field_prefix}phone"), m))?,
            )
        }
        Patch::Null => None,
        Patch::Missing => current.phone.clone(),
    };
    let mut attributes = current.attributes.as_object().cloned().unwrap_or_default();
    for (key, value) in &changes.attributes {
        if value.is_null() {
            attributes.remove(key);
        } else {
            attributes.insert(key.clone(), value.clone());
        }
    }
    let mut consents = current.consents.clone();
    let now = Utc::now();
    for (channel, purpose, input) in &changes.consents {
        consents.record(*channel, *purpose, input, now, "api");
    }
    Ok(ContactFields {
        email: changes.email.apply(current.email.clone()),
        phone,
        viber_id: changes.viber_id.apply(current.viber_id.clone()),
        first_name: changes.first_name.apply(current.first_name.clone()),
        last_name: changes.last_name.apply(current.last_name.clone()),
        locale: changes.locale.apply(current.locale.clone()),
        country,
        timezone: changes.timezone.apply(current.timezone.clone()),
        birthday: changes.birthday.apply(current.birthday),
        owner_agent_id: changes.owner_agent_id.apply(current.owner_agent_id),
        attributes: Value::Object(attributes),
        consents,
    })
}

/// Changed fields as `{"field": {"old", "new"}}`; attributes as `attributes.<name>`, consents
/// as `consents.<channel>.<purpose>` (the status).
fn diff(old: &ContactFields, new: &ContactFields) -> Map<String, Value> {
    let mut out = Map::new();
    let mut scalar = |name: &str, a: Value, b: Value| {
        if a != b {
            out.insert(name.to_owned(), change(a, b));
        }
    };
    scalar("email", json!(old.email), json!(new.email));
    scalar("phone", json!(old.phone), json!(new.phone));
    scalar("viber_id", json!(old.viber_id), json!(new.viber_id));
    scalar("first_name", json!(old.first_name), json!(new.first_name));
    scalar("last_name", json!(old.last_name), json!(new.last_name));
    scalar("locale", json!(old.locale), json!(new.locale));
    scalar("country", json!(old.country), json!(new.country));
    scalar("timezone", json!(old.timezone), json!(new.timezone));
    scalar("birthday", json!(old.birthday), json!(new.birthday));
    scalar(
        "owner_agent_id",
        json!(old.owner_agent_id),
        json!(new.owner_agent_id),
    );
    let empty = Map::new();
    let old_attrs = old.attributes.as_object().unwrap_or(&empty);
    let new_attrs = new.attributes.as_object().unwrap_or(&empty);
    for key in old_attrs.keys().chain(new_attrs.keys()) {
        let (a, b) = (old_attrs.get(key), new_attrs.get(key));
        if a != b {
            out.insert(
                format!("attributes.{key}"),
                change(
                    a.cloned().unwrap_or(Value::Null),
                    b.cloned().unwrap_or(Value::Null),
                ),
            );
        }
    }
    for channel in [Channel::Email, Channel::Sms, Channel::Viber] {
        for purpose in [Purpose::Marketing, Purpose::Transactional] {
            let (a, b) = (
                old.consents.status(channel, purpose),
                new.consents.status(channel, purpose),
            );
            if a != b {
                let name = format!("consents.{}.{}", channel.as_str(), purpose.as_str());
                out.insert(name, change(json!(a), json!(b)));
            }
        }
    }
    out
}

/// The id of the live contact with this external id, creating it (with the given addresses)
/// when there is none.
pub async fn ensure_by_external_id(
    conn: &mut PgConnection,
    tenant: TenantId,
    external_id: &str,
    email: Option<&str>,
    phone: Option<&str>,
) -> StoreResult<Uuid> {
    let wanted = ExternalRef {
        external_id,
        email,
        phone,
    };
    ensure_by_external_ids(conn, tenant, &[wanted])
        .await?
        .remove(external_id)
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("contact {external_id} not ensured")))
}

/// A contact named by the tenant's external id, with the addresses to create it with.
#[derive(Debug, Clone, Copy)]
pub struct ExternalRef<'a> {
    pub external_id: &'a str,
    pub email: Option<&'a str>,
    pub phone: Option<&'a str>,
}

/// The ids of the contacts with these external ids, creating the missing ones (each with a
/// `contact.created` event) in one statement: one round trip when they all exist, two or three
/// when some are new. New contacts are inserted in external-id order, so concurrent batches
/// wait on each other instead of deadlocking; a contact a concurrent request created first is
/// read back once that request commits.
pub async fn ensure_by_external_ids(
    conn: &mut PgConnection,
    tenant: TenantId,
    refs: &[ExternalRef<'_>],
) -> StoreResult<HashMap<String, Uuid>> {
    let mut found: HashMap<String, Uuid> = HashMap::with_capacity(refs.len());
    for _ in 0..3 {
        let wanted: Vec<&str> = refs
            .iter()
            .map(|r| r.external_id)
            .filter(|x| !found.contains_key(*x))
            .collect();
        if wanted.is_empty() {
            return Ok(found);
        }
        let existing: Vec<(String, Uuid)> = sqlx::query_as(
            "SELECT external_id, id FROM contacts
             WHERE tenant_id = $1 AND external_id = ANY($2)",
        )
        .bind(tenant)
        .bind(&wanted)
        .fetch_all(&mut *conn)
        .await?;
        found.extend(existing);
        let mut missing: Vec<&ExternalRef<'_>> = refs
            .iter()
            .filter(|r| !found.contains_key(r.external_id))
            .collect();
        if missing.is_empty() {
            return Ok(found);
        }
        missing.sort_by_key(|r| r.external_id);
        missing.dedup_by_key(|r| r.external_id);
        let ids: Vec<Uuid> = missing.iter().map(|_| Uuid::now_v7()).collect();
        let external_ids: Vec<&str> = missing.iter().map(|r| r.external_id).collect();
        let emails: Vec<Option<&str>> = missing.iter().map(|r| r.email).collect();
        let phones: Vec<Option<&str>> = missing.iter().map(|r| r.phone).collect();
        let created: Vec<(String, Uuid)> = sqlx::query_as(
            "INSERT INTO contacts (tenant_id, id, external_id, email, phone)
             SELECT $1, id, x, e, p
             FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[])
                  WITH ORDINALITY AS u(id, x, e, p, n)
             ORDER BY n
             ON CONFLICT (tenant_id, external_id) DO NOTHING
             RETURNING external_id, id",
        )
        .bind(tenant)
        .bind(&ids)
        .bind(&external_ids)
        .bind(&emails)
        .bind(&phones)
        .fetch_all(&mut *conn)
        .await?;
        let emitted: Vec<events::Emitted> = created
            .iter()
            .map(|(_, id)| events::Emitted {
                tenant,
                contact_id: *id,
                kind: kinds::CONTACT_CREATED,
                properties: json!({"via": "event"}),
                subject: None,
            })
            .collect();
        events::append_many(conn, &emitted).await?;
        found.extend(created);
    }
    if refs.iter().all(|r| found.contains_key(r.external_id)) {
        return Ok(found);
    }
    Err(StoreError::Unavailable(
        "the contact is being created by concurrent requests; retry".to_owned(),
    ))
}

/// How a customer who writes in is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownBy {
    /// E.164.
    Phone(String),
    ViberId(String),
    /// Lower-cased.
    Email(String),
}

/// The live contact with this address (the most recently updated, if several), or a new one
/// with only that address (`contact.created` with `via: inbound`). Concurrent first messages
/// from one new sender make one contact: they wait on a lock of the address.
pub async fn find_or_create_by_address(
    conn: &mut PgConnection,
    tenant: TenantId,
    address: &KnownBy,
    channel: Channel,
) -> StoreResult<Uuid> {
    let (column, value) = match address {
        KnownBy::Phone(p) => ("phone", p.as_str()),
        KnownBy::ViberId(v) => ("viber_id", v.as_str()),
        KnownBy::Email(e) => ("email", e.as_str()),
    };
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("contact-address/{tenant}/{column}/{value}"))
        .execute(&mut *conn)
        .await?;
    // Emails are compared without case, as mail servers do.
    let matches = if column == "email" {
        "lower(email) = $2"
    } else {
        "{column} = $2"
    };
    let existing: Option<Uuid> = sqlx::query_scalar(&format!(
        "SELECT id FROM contacts WHERE tenant_id = $1 AND {} AND erased_at IS NULL
         ORDER BY updated_at DESC LIMIT 1",
        matches.replace("{column}", column)
    ))
    .bind(tenant)
    .bind(value)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let id = Uuid::now_v7();
    sqlx::query(&format!(
        "INSERT INTO contacts (tenant_id, id, {column}) VALUES ($1, $2, $3)"
    ))
    .bind(tenant)
    .bind(id)
    .bind(value)
    .execute(&mut *conn)
    .await?;
    events::emit(
        conn,
        tenant,
        id,
        kinds::CONTACT_CREATED,
        json!({"via": "inbound", "channel": channel}),
    )
    .await?;
    Ok(id)
}

/// The oldest live contact with this address (`email` or `phone` column).
pub async fn id_by_address(
    conn: &mut PgConnection,
    tenant: TenantId,
    column: Address,
    value: &str,
) -> StoreResult<Option<Uuid>> {
    Ok(ids_by_address(conn, tenant, column, &[value])
        .await?
        .remove(value))
}

/// The oldest live contact with each of these addresses (`email` or `phone` column), in one
/// query; addresses no contact has are absent.
pub async fn ids_by_address(
    conn: &mut PgConnection,
    tenant: TenantId,
    column: Address,
    values: &[&str],
) -> StoreResult<HashMap<String, Uuid>> {
    if values.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = match column {
        Address::Email => {
            "SELECT DISTINCT ON (email) email, id FROM contacts
             WHERE tenant_id = $1 AND email = ANY($2) AND erased_at IS NULL ORDER BY email, id"
        }
        Address::Phone => {
            "SELECT DISTINCT ON (phone) phone, id FROM contacts
             WHERE tenant_id = $1 AND phone = ANY($2) AND erased_at IS NULL ORDER BY phone, id"
        }
    };
    let rows: Vec<(String, Uuid)> = sqlx::query_as(sql)
        .bind(tenant)
        .bind(values)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The live contact a reference names (by external id, else email, else phone), without
/// creating one. Invalid addresses are a 422 on `{field}.email` or `{field}.phone`.
pub async fn find_by_ref(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    r: &crate::domain::ContactRef,
    field: &str,
) -> StoreResult<Option<Uuid>> {
    if let Some(external_id) = &r.external_id {
        return Ok(sqlx::query_scalar(
            "SELECT id FROM contacts WHERE tenant_id = $1 AND external_id = $2",
        )
        .bind(tenant.id)
        .bind(external_id)
        .fetch_optional(conn)
        .await?);
    }
    if let Some(email) = &r.email {
        let email =
            validate::email(email).map_err(|m| StoreError::field(format!("{field}.email"), m))?;
        return id_by_address(conn, tenant.id, Address::Email, &email).await;
    }
    if let Some(phone) = &r.phone {
        let phone = validate::phone(phone, Some(&tenant.default_country))
            .map_err(|m| StoreError::field(format!("{field}.phone"), m))?;
        return id_by_address(conn, tenant.id, Address::Phone, &phone).await;
    }
    Err(StoreError::field(
        field,
        "give the contact's external_id, email or phone",
    ))
}

/// Records a consent decision made outside the API (an unsubscribe link, a STOP reply, a
/// Viber unsubscribe), with `contact.updated` and, for an opt-out of marketing,
/// `contact.unsubscribed` on the timeline. False when nothing changed.
#[expect(clippy::too_many_arguments, reason = "one decision's facts")]
pub async fn set_consent(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact_id: Uuid,
    channel: Channel,
    purpose: Purpose,
    status: ConsentStatus,
    source: &str,
    message_id: Option<Uuid>,
) -> StoreResult<bool> {
    let old: Option<Value> = sqlx::query_scalar(
        "SELECT consents -> $3 -> $4 -> 'status' FROM contacts
         WHERE tenant_id = $1 AND id = $2 AND erased_at IS NULL FOR UPDATE",
    )
    .bind(tenant)
    .bind(contact_id)
    .bind(channel.as_str())
    .bind(purpose.as_str())
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    if old.as_ref().and_then(Value::as_str) == Some(status.as_str()) {
        return Ok(false);
    }
    let done = sqlx::query(
        "UPDATE contacts SET consents = jsonb_set(
                CASE WHEN consents ? $3 THEN consents ELSE consents || jsonb_build_object($3::text, '{}'::jsonb) END,
                ARRAY[$3, $4], $5, true),
            updated_at = now()
         WHERE tenant_id = $1 AND id = $2 AND erased_at IS NULL",
    )
    .bind(tenant)
    .bind(contact_id)
    .bind(channel.as_str())
    .bind(purpose.as_str())
    .bind(json!({"status": status.as_str(), "at": Utc::now(), "source": source}))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let field = format!("consents.{}.{}", channel.as_str(), purpose.as_str());
    let mut changes = Map::new();
    changes.insert(
        field,
        change(old.unwrap_or(Value::Null), json!(status.as_str())),
    );
    events::emit(
        conn,
        tenant,
        contact_id,
        kinds::CONTACT_UPDATED,
        json!({"changes": changes}),
    )
    .await?;
    if status == ConsentStatus::OptedOut && purpose == Purpose::Marketing {
        events::emit(
            conn,
            tenant,
            contact_id,
            kinds::CONTACT_UNSUBSCRIBED,
            json!({"channel": channel.as_str(), "source": source, "message_id": message_id}),
        )
        .await?;
    }
    Ok(true)
}

/// An address column a contact can be found by.
#[derive(Debug, Clone, Copy)]
pub enum Address {
    Email,
    Phone,
}

/// The right to erasure: personal data is removed from the contact (the counters stay, so
/// aggregates keep adding up); the other capabilities' copies are erased by their
/// `domain::Eraser`s in the same transaction. False when there is no such live contact.
pub async fn erase(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE contacts SET external_id = NULL, email = NULL, phone = NULL, viber_id = NULL,
            first_name = NULL, last_name = NULL, locale = NULL, timezone = NULL, birthday = NULL,
            owner_agent_id = NULL, attributes = '{}', consents = '{}', erased_at = now(),
            updated_at = now()
         WHERE tenant_id = $1 AND id = $2 AND erased_at IS NULL",
    )
    .bind(tenant)
    .bind(id)
    .execute(conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    Ok(true)
}

/// The most recently updated live contact with this E.164 number.
pub async fn id_by_phone(
    conn: &mut PgConnection,
    tenant: TenantId,
    phone: &str,
) -> StoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM contacts WHERE tenant_id = $1 AND phone = $2 AND erased_at IS NULL
         ORDER BY updated_at DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(phone)
    .fetch_optional(conn)
    .await?)
}

/// The language to write to a contact in: its own, else its tenant's default.
pub async fn locale_of(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> StoreResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(c.locale, t.default_locale) FROM contacts c JOIN tenants t ON t.id = c.tenant_id
         WHERE c.tenant_id = $1 AND c.id = $2",
    )
    .bind(tenant)
    .bind(contact)
    .fetch_optional(conn)
    .await?)
}

/// The live contacts with this Viber user id.
pub async fn ids_by_viber_id(
    conn: &mut PgConnection,
    tenant: TenantId,
    viber_id: &str,
) -> StoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM contacts WHERE tenant_id = $1 AND viber_id = $2 AND erased_at IS NULL",
    )
    .bind(tenant)
    .bind(viber_id)
    .fetch_all(conn)
    .await?)
}
