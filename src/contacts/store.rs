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

/// The columns of [`Contact`] on `contacts c` before `stats`.
macro_rules! contact_fields {
    () => {
        "c.id, c.external_id, c.email, c.phone, c.viber_id, c.first_name, c.last_name, c.locale,
    c.country, c.timezone, c.birthday, c.owner_agent_id, c.attributes, c.consents,"
    };
}

/// The columns of [`Contact`] on `contacts c`, with `stats` and `last_event_at` gathered from
/// the per-type counters; other stores' read models select them too.
pub const CONTACT_COLUMNS: &str = concat!(
    contact_fields!(),
    "
    (SELECT coalesce(jsonb_object_agg(s.event_type, s.count), '{}'::jsonb)
       FROM contact_event_counts s
      WHERE s.tenant_id = c.tenant_id AND s.contact_id = c.id) AS stats,
    (SELECT coalesce(jsonb_object_agg(s.event_type, s.last_at)
                       FILTER (WHERE s.last_at IS NOT NULL), '{}'::jsonb)
       FROM contact_event_counts s
      WHERE s.tenant_id = c.tenant_id AND s.contact_id = c.id) AS last_event_at,
    c.created_at, c.updated_at"
);

/// [`CONTACT_COLUMNS`] with `stats` and `last_event_at` left empty: a quarter of the cost of
/// reading a contact (two look-ups in the counters per contact), for walks whose condition and
/// message do not read them.
const CONTACT_COLUMNS_WITHOUT_STATS: &str = concat!(
    contact_fields!(),
    "
    '{}'::jsonb AS stats, '{}'::jsonb AS last_event_at, c.created_at, c.updated_at"
);

/// Whether a read fills in a contact's `stats` and `last_event_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stats {
    Read,
    /// Left empty (`{}`): only for readers that never look at them.
    Skipped,
}

impl Stats {
    fn columns(self) -> &'static str {
        match self {
            Stats::Read => CONTACT_COLUMNS,
            Stats::Skipped => CONTACT_COLUMNS_WITHOUT_STATS,
        }
    }
}

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
    read_many(conn, tenant, ids, Stats::Read).await
}

/// [`get_many`], with or without the contacts' `stats`.
pub async fn read_many(
    conn: &mut PgConnection,
    tenant: TenantId,
    ids: &[Uuid],
    stats: Stats,
) -> StoreResult<Vec<Contact>> {
    let sql = format!(
        "SELECT {} FROM contacts c
         WHERE c.tenant_id = $1 AND c.id = ANY($2) AND c.erased_at IS NULL",
        stats.columns()
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(ids)
        .fetch_all(conn)
        .await?)
}

/// Up to `limit` live contacts after `after` in id order: one page of a walk over every
/// contact of the tenant (segments, broadcasts). Each page is its own statement: no lock or
/// snapshot is held between pages.
pub async fn scan_page(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<Uuid>,
    limit: i64,
    stats: Stats,
) -> StoreResult<Vec<Contact>> {
    let sql = format!(
        "SELECT {} FROM contacts c
         WHERE c.tenant_id = $1 AND ($2::uuid IS NULL OR c.id > $2) AND c.erased_at IS NULL
         ORDER BY c.id LIMIT $3",
        stats.columns()
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await?)
}

/// A test the database applies to a contact before it is read whole: a walk reads in full
/// only the contacts that pass them all (see `campaigns::cel::requirements`, which these are
/// built from).
#[derive(Debug, Clone, PartialEq)]
pub enum Clause {
    /// A text column is one of the values.
    Column(&'static str, Vec<String>),
    /// An attribute is one of these JSON values.
    Attribute(String, Vec<Value>),
    /// An attribute is a number within the bounds (either may be open).
    Number(String, Option<f64>, Option<f64>),
    /// The contact has the attribute.
    HasAttribute(String),
}

/// The columns a [`Clause::Column`] may test: named here, never taken from a request.
pub const NARROWING_COLUMNS: [&str; 8] = [
    "external_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "locale",
    "country",
    "timezone",
];

/// The column of that name a [`Clause::Column`] may test.
pub fn narrowing_column(name: &str) -> Option<&'static str> {
    NARROWING_COLUMNS.iter().copied().find(|c| *c == name)
}

/// Up to `limit` live contacts' ids after `after` in id order, each with whether it passes
/// every clause: one page of a walk, read without the contacts' records. Clauses are bound
/// values on a fixed list of columns.
pub async fn scan_ids(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<Uuid>,
    limit: i64,
    clauses: &[Clause],
) -> StoreResult<Vec<(Uuid, bool)>> {
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new("SELECT c.id, coalesce(true");
    for clause in clauses {
        q.push(" AND ");
        match clause {
            Clause::Column(column, values) => {
                let column = narrowing_column(column).ok_or_else(|| {
                    StoreError::Internal(anyhow::anyhow!("{column} cannot narrow a walk"))
                })?;
                q.push(format_args!("c.{column} = ANY("))
                    .push_bind(values.clone())
                    .push("::text[])");
            }
            Clause::Attribute(key, values) => {
                q.push("c.attributes -> ")
                    .push_bind(key.clone())
                    .push("::text = ANY(")
                    .push_bind(values.clone())
                    .push("::jsonb[])");
            }
            Clause::Number(key, low, high) => {
                q.push("CASE WHEN jsonb_typeof(c.attributes -> ")
                    .push_bind(key.clone())
                    .push("::text) = 'number' THEN (c.attributes ->> ")
                    .push_bind(key.clone())
                    .push("::text)::numeric BETWEEN coalesce(")
                    .push_bind(*low)
                    .push("::float8::numeric, '-Infinity'::numeric) AND coalesce(")
                    .push_bind(*high)
                    .push("::float8::numeric, 'Infinity'::numeric) ELSE false END");
            }
            Clause::HasAttribute(key) => {
                q.push("c.attributes ? ")
                    .push_bind(key.clone())
                    .push("::text");
            }
        }
    }
    q.push(", false) FROM contacts c WHERE c.tenant_id = ")
        .push_bind(tenant)
        .push(" AND (")
        .push_bind(after)
        .push("::uuid IS NULL OR c.id > ")
        .push_bind(after)
        .push(") AND c.erased_at IS NULL ORDER BY c.id LIMIT ")
        .push_bind(limit);
    Ok(q.build_query_as().fetch_all(conn).await?)
}

/// The time zones the tenant's live contacts name (contacts without one follow the tenant's).
pub async fn time_zones(conn: &mut PgConnection, tenant: TenantId) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT timezone FROM contacts
         WHERE tenant_id = $1 AND timezone IS NOT NULL AND erased_at IS NULL",
    )
    .bind(tenant)
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

/// Live contacts in id order after `after`, `limit` of them: the export's pages (each page
/// its own short query, so an export holds no transaction open however slow its reader).
pub async fn export_page(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &ListFilter,
    after: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Contact>> {
    page(conn, tenant, filter, after, false, limit).await
}

/// Live contacts matching `filter` past the cursor id: newest first (before it), or oldest
/// first (after it).
async fn page(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &ListFilter,
    cursor: Option<Uuid>,
    newest_first: bool,
    limit: i64,
) -> StoreResult<Vec<Contact>> {
    let (past, order) = if newest_first {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    let sql = format!(
        "SELECT {CONTACT_COLUMNS} FROM contacts c
         WHERE c.tenant_id = $1 AND c.erased_at IS NULL
           AND ($2::text IS NULL OR c.email = $2)
           AND ($3::text IS NULL OR c.phone = $3)
           AND ($4::text IS NULL OR c.external_id = $4)
           AND ($5::uuid IS NULL OR c.id {past} $5)
         ORDER BY c.id {order} LIMIT $6"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(&filter.email)
        .bind(&filter.phone)
        .bind(&filter.external_id)
        .bind(cursor)
        .bind(limit)
        .fetch_all(conn)
        .await?)
}

/// The attribute names the tenant's live contacts use, sorted: the CSV export's columns.
pub async fn attribute_names(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT k FROM contacts c, jsonb_object_keys(c.attributes) k
         WHERE c.tenant_id = $1 AND c.erased_at IS NULL AND jsonb_typeof(c.attributes) = 'object'
         ORDER BY k",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?)
}

/// Live contacts newest first, before the cursor id (one more than `limit`, to tell whether
/// a next page exists).
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &ListFilter,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Contact>> {
    page(conn, tenant, filter, before, true, limit + 1).await
}

/// What an upsert did.
#[derive(Debug)]
pub enum Upserted {
    Created(Contact),
    Updated(Contact),
    Unchanged(Contact),
}

/// Creates or updates the contact with this external id: [`upsert_many`] with one item.
/// Validation errors (a phone number that is invalid in the contact's country) come before
/// any write, so a caller can continue the transaction with other work.
pub async fn upsert(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    external_id: &str,
    changes: &ContactChanges,
    field_prefix: &str,
) -> StoreResult<Upserted> {
    let item = BatchItem {
        external_id,
        field_prefix: field_prefix.to_owned(),
        changes,
    };
    let outcome = upsert_many(
        conn,
        tenant,
        std::slice::from_ref(&item),
        "upsert",
        WriteMode::Upsert,
    )
    .await?
    .pop()
    .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("an upsert without an outcome")))?;
    let contact = match outcome.id() {
        Some(id) => Some(must_get(conn, tenant.id, id).await?),
        None => None,
    };
    Upserted::from_outcome(outcome, |_| contact.clone())
}

impl Upserted {
    /// What an item's outcome means for its request: the contact (found by `contact`) as
    /// created, updated or unchanged, or the item's errors.
    pub fn from_outcome(
        outcome: ItemOutcome,
        contact: impl Fn(Uuid) -> Option<Contact>,
    ) -> StoreResult<Upserted> {
        let found = |id: Uuid| {
            contact(id).ok_or_else(|| {
                StoreError::Internal(anyhow::anyhow!("contact {id} vanished in its transaction"))
            })
        };
        Ok(match outcome {
            ItemOutcome::Created(id) => Upserted::Created(found(id)?),
            ItemOutcome::Updated(id) => Upserted::Updated(found(id)?),
            ItemOutcome::Unchanged(id) => Upserted::Unchanged(found(id)?),
            ItemOutcome::Rejected(errors) => {
                return Err(StoreError::Invalid(crate::validate::Invalid(errors)));
            }
            ItemOutcome::Skipped(_) => {
                return Err(StoreError::Internal(anyhow::anyhow!(
                    "an upsert skipped its only item"
                )));
            }
        })
    }
}

impl ItemOutcome {
    /// The contact's id, unless the item was rejected.
    pub fn id(&self) -> Option<Uuid> {
        match self {
            ItemOutcome::Created(id) | ItemOutcome::Updated(id) | ItemOutcome::Unchanged(id) => {
                Some(*id)
            }
            ItemOutcome::Skipped(id) => *id,
            ItemOutcome::Rejected(_) => None,
        }
    }
}

/// One validated contact of a batch.
#[derive(Debug)]
pub struct BatchItem<'a> {
    pub external_id: &'a str,
    /// Put before field names in errors: `contacts[3].`.
    pub field_prefix: String,
    pub changes: &'a ContactChanges,
}

/// Which items of a batch may create and which may update a contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Create the contact if missing, else update it.
    #[default]
    Upsert,
    /// Only create: an item naming an existing contact is skipped.
    CreateOnly,
    /// Only update: an item naming no contact is skipped.
    UpdateOnly,
}

/// What a batch did with one item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Created(Uuid),
    Updated(Uuid),
    Unchanged(Uuid),
    /// Left alone by the [`WriteMode`]: the existing contact (create only) or none (update
    /// only).
    Skipped(Option<Uuid>),
    /// Nothing written for it: an unknown agent, a phone number invalid in the contact's
    /// country.
    Rejected(Vec<crate::validate::FieldError>),
}

/// Where one external id of a batch stands while its items are applied in order.
struct Pending {
    /// The stored contact, if it exists.
    stored: Option<(Uuid, ContactFields)>,
    /// The id a new contact gets.
    new_id: Uuid,
    current: ContactFields,
    /// An item created it (it was not stored).
    created: bool,
}

/// Creates or updates many contacts in a handful of statements, whatever their number: one
/// to check the agents named, one to lock and read the existing contacts (in external-id
/// order, so concurrent batches wait for each other instead of deadlocking), one insert of
/// the new ones, one update of the changed ones, one append of their `contact.created` /
/// `contact.updated` events. Same semantics as one upsert per item, in item order: items of
/// one external id apply one after the other; a rejected item writes nothing and does not
/// stop the others; `mode` may skip items that would create or update. A contact a concurrent
/// request creates meanwhile is locked and updated instead (up to three times). Outcomes in
/// the order of `items`.
pub async fn upsert_many(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    items: &[BatchItem<'_>],
    via: &str,
    mode: WriteMode,
) -> StoreResult<Vec<ItemOutcome>> {
    let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; items.len()];
    // Agents named: one query for all.
    let agents: Vec<Uuid> = items
        .iter()
        .filter_map(|i| match i.changes.owner_agent_id {
            Patch::Value(a) => Some(a),
            _ => None,
        })
        .collect();
    let known_agents: std::collections::HashSet<Uuid> = if agents.is_empty() {
        Default::default()
    } else {
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM agents WHERE tenant_id = $1 AND id = ANY($2)")
            .bind(tenant.id)
            .bind(&agents)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    };
    for (n, item) in items.iter().enumerate() {
        if let Patch::Value(agent) = item.changes.owner_agent_id {
            if !known_agents.contains(&agent) {
                // Another tenant's agent is as unknown here as one that does not exist.
                outcomes[n] = Some(ItemOutcome::Rejected(vec![
                    crate::validate::FieldError::new(
                        format!("{}owner_agent_id", item.field_prefix),
                        format!("no agent with id {agent}"),
                    ),
                ]));
            }
        }
    }
    // Items by external id, in item order within each.
    let mut order: Vec<usize> = (0..items.len())
        .filter(|n| outcomes[*n].is_none())
        .collect();
    order.sort_by(|a, b| (items[*a].external_id, *a).cmp(&(items[*b].external_id, *b)));
    let mut wanted: Vec<&str> = order.iter().map(|n| items[*n].external_id).collect();
    wanted.dedup();
    for _ in 0..3 {
        if wanted.is_empty() {
            break;
        }
        let sql = format!(
            "SELECT id, external_id, {FIELD_COLUMNS} FROM contacts
             WHERE tenant_id = $1 AND external_id = ANY($2) AND erased_at IS NULL
             ORDER BY external_id FOR UPDATE"
        );
        let rows: Vec<StoredRow> = sqlx::query_as(&sql)
            .bind(tenant.id)
            .bind(&wanted)
            .fetch_all(&mut *conn)
            .await?;
        let mut pending: HashMap<&str, Pending> = wanted
            .iter()
            .map(|x| {
                (
                    *x,
                    Pending {
                        stored: None,
                        new_id: Uuid::now_v7(),
                        current: ContactFields::empty(),
                        created: false,
                    },
                )
            })
            .collect();
        for row in rows {
            if let Some(p) = pending.get_mut(row.external_id.as_str()) {
                p.current = row.fields.clone();
                p.stored = Some((row.id, row.fields));
            }
        }
        // Apply each item to its contact's state, in order; decide its outcome and event.
        let mut decided: Vec<(usize, ItemOutcome, Option<events::Emitted>)> = Vec::new();
        for &n in order
            .iter()
            .filter(|n| wanted.binary_search(&items[**n].external_id).is_ok())
        {
            let item = &items[n];
            let Some(p) = pending.get_mut(item.external_id) else {
                continue;
            };
            let exists = p.stored.is_some() || p.created;
            let id = p.stored.as_ref().map_or(p.new_id, |(id, _)| *id);
            match (mode, exists) {
                (WriteMode::CreateOnly, true) => {
                    decided.push((n, ItemOutcome::Skipped(Some(id)), None));
                    continue;
                }
                (WriteMode::UpdateOnly, false) => {
                    decided.push((n, ItemOutcome::Skipped(None), None));
                    continue;
                }
                _ => {}
            }
            let next = match merge(tenant, &p.current, item.changes, &item.field_prefix) {
                Ok(next) => next,
                Err(StoreError::Invalid(crate::validate::Invalid(errors))) => {
                    decided.push((n, ItemOutcome::Rejected(errors), None));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let emitted = |kind, properties| events::Emitted {
                tenant: tenant.id,
                contact_id: id,
                kind,
                properties,
                subject: None,
            };
            if !exists {
                p.created = true;
                decided.push((
                    n,
                    ItemOutcome::Created(id),
                    Some(emitted(kinds::CONTACT_CREATED, json!({"via": via}))),
                ));
            } else if next == p.current {
                decided.push((n, ItemOutcome::Unchanged(id), None));
            } else {
                let changes = diff(&p.current, &next);
                decided.push((
                    n,
                    ItemOutcome::Updated(id),
                    Some(emitted(kinds::CONTACT_UPDATED, json!({"changes": changes}))),
                ));
            }
            p.current = next;
        }
        // The new contacts, in external-id order; those a concurrent request created first
        // go round again, to be locked and updated.
        let mut new_rows = FieldArrays::default();
        let mut changed_rows = FieldArrays::default();
        for x in &wanted {
            let Some(p) = pending.get_mut(x) else {
                continue;
            };
            match &p.stored {
                None if p.created => new_rows.push(p.new_id, x, std::mem::take(&mut p.current)),
                Some((id, stored)) if *stored != p.current => {
                    changed_rows.push(*id, x, std::mem::take(&mut p.current));
                }
                _ => {}
            }
        }
        let inserted: std::collections::HashSet<String> = if new_rows.ids.is_empty() {
            Default::default()
        } else {
            new_rows
                .insert(conn, tenant.id)
                .await?
                .into_iter()
                .collect()
        };
        if !changed_rows.ids.is_empty() {
            changed_rows.update(conn, tenant.id).await?;
        }
        // Sorted, as `wanted` is.
        let lost: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|x| pending[x].created && !inserted.contains(*x))
            .collect();
        let mut emitted = Vec::new();
        for (n, outcome, event) in decided {
            if lost.binary_search(&items[n].external_id).is_ok() {
                continue;
            }
            emitted.extend(event);
            outcomes[n] = Some(outcome);
        }
        if !emitted.is_empty() {
            events::append_many(conn, &emitted).await?;
        }
        wanted = lost;
    }
    if !wanted.is_empty() {
        return Err(StoreError::Unavailable(
            "the contact is being changed by concurrent requests; retry".to_owned(),
        ));
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Internal(anyhow::anyhow!("an item without outcome"))))
        .collect()
}

#[derive(sqlx::FromRow)]
struct StoredRow {
    id: Uuid,
    external_id: String,
    #[sqlx(flatten)]
    fields: ContactFields,
}

/// Contacts' writable fields as columns, for one UNNEST statement.
#[derive(Default)]
struct FieldArrays {
    ids: Vec<Uuid>,
    external_ids: Vec<String>,
    email: Vec<Option<String>>,
    phone: Vec<Option<String>>,
    viber_id: Vec<Option<String>>,
    first_name: Vec<Option<String>>,
    last_name: Vec<Option<String>>,
    locale: Vec<Option<String>>,
    country: Vec<Option<String>>,
    timezone: Vec<Option<String>>,
    birthday: Vec<Option<chrono::NaiveDate>>,
    owner_agent_id: Vec<Option<Uuid>>,
    attributes: Vec<Value>,
    consents: Vec<Value>,
}

impl FieldArrays {
    /// Takes the row's fields (moved, not copied: a batch's rows are many).
    fn push(&mut self, id: Uuid, external_id: &str, f: ContactFields) {
        self.ids.push(id);
        self.external_ids.push(external_id.to_owned());
        self.email.push(f.email);
        self.phone.push(f.phone);
        self.viber_id.push(f.viber_id);
        self.first_name.push(f.first_name);
        self.last_name.push(f.last_name);
        self.locale.push(f.locale);
        self.country.push(f.country);
        self.timezone.push(f.timezone);
        self.birthday.push(f.birthday);
        self.owner_agent_id.push(f.owner_agent_id);
        self.attributes.push(f.attributes);
        self.consents
            .push(serde_json::to_value(&f.consents).unwrap_or_else(|_| json!({})));
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.external_ids)
            .bind(&self.email)
            .bind(&self.phone)
            .bind(&self.viber_id)
            .bind(&self.first_name)
            .bind(&self.last_name)
            .bind(&self.locale)
            .bind(&self.country)
            .bind(&self.timezone)
            .bind(&self.birthday)
            .bind(&self.owner_agent_id)
            .bind(&self.attributes)
            .bind(&self.consents)
    }

    /// Inserts the rows (in their order); the external ids inserted (the others were taken
    /// by a concurrent request meanwhile).
    async fn insert(&self, conn: &mut PgConnection, tenant: TenantId) -> StoreResult<Vec<String>> {
        use sqlx::Row;
        let query = sqlx::query(
            "INSERT INTO contacts (tenant_id, id, external_id, email, phone, viber_id, first_name,
                last_name, locale, country, timezone, birthday, owner_agent_id, attributes,
                consents)
             SELECT $1, u.id, u.x, u.email, u.phone, u.viber_id, u.first_name, u.last_name,
                    u.locale, u.country, u.timezone, u.birthday, u.owner_agent_id, u.attributes,
                    u.consents
             FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::date[],
                         $13::uuid[], $14::jsonb[], $15::jsonb[]) WITH ORDINALITY
                  AS u(id, x, email, phone, viber_id, first_name, last_name, locale, country,
                       timezone, birthday, owner_agent_id, attributes, consents, n)
             ORDER BY u.n
             ON CONFLICT (tenant_id, external_id) DO NOTHING
             RETURNING external_id",
        )
        .bind(tenant);
        let rows = self.bind(query).fetch_all(conn).await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?)
    }

    /// Writes the rows' fields over the contacts with their ids (already locked).
    async fn update(&self, conn: &mut PgConnection, tenant: TenantId) -> StoreResult<()> {
        let query = sqlx::query(
            "UPDATE contacts c SET email = u.email, phone = u.phone, viber_id = u.viber_id,
                first_name = u.first_name, last_name = u.last_name, locale = u.locale,
                country = u.country, timezone = u.timezone, birthday = u.birthday,
                owner_agent_id = u.owner_agent_id, attributes = u.attributes,
                consents = u.consents, updated_at = now()
             FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::date[],
                         $13::uuid[], $14::jsonb[], $15::jsonb[])
                  AS u(id, x, email, phone, viber_id, first_name, last_name, locale, country,
                       timezone, birthday, owner_agent_id, attributes, consents)
             WHERE c.tenant_id = $1 AND c.id = u.id",
        )
        .bind(tenant);
        self.bind(query).execute(conn).await?;
        Ok(())
    }
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
        // The stored number again (a nightly sync): it is E.164, valid when it was stored,
        // and an E.164 number reads the same in any country. Parsing is the costly part of a
        // contact write.
        Patch::Value(raw) if current.phone.as_deref() == Some(raw.trim()) => current.phone.clone(),
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
        let source = changes.consent_source.as_deref().unwrap_or("api");
        consents.record(*channel, *purpose, input, now, source);
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
