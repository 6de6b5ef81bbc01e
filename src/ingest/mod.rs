//! Event ingestion: validate, resolve contacts (creating the new ones), deduplicate, append
//! with exact ordinals. Above `events` (the log) and `contacts`, which it writes through.
//!
//! A batch runs in one transaction. Contacts are resolved in a sorted order and counters are
//! bumped in (contact, type) order, so two concurrent batches take their locks in the same order
//! and cannot deadlock; events of one contact and type keep their order within the batch.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::contacts::store::{self as contacts, Address, ExternalRef};
use crate::domain::{TenantContext, TenantId};
use crate::error::{StoreError, StoreResult};
use crate::events::model::{Accepted, NewEvent};
use crate::events::store::{self, NewEventRow};
use crate::validate;
use crate::validate::Errors;
use crate::validate::FieldError;

pub mod routes;
pub mod writer;

/// Most events a batch may carry.
pub const MAX_BATCH: usize = 1000;

/// How far in the future `occurred_at` may be (clock skew of the sender).
const MAX_FUTURE: chrono::Duration = chrono::Duration::hours(24);

/// A validated event.
#[derive(Debug, Clone)]
pub struct ValidEvent {
    pub kind: String,
    pub contact: ValidRef,
    pub occurred_at: DateTime<Utc>,
    pub properties: Value,
    pub idempotency_key: Option<String>,
    /// Where the event stands in its request, for the names of fields in errors found later.
    pub at: FieldPrefix,
}

/// Where an event stands in its request: alone, or at an index of a batch. Field names in
/// errors are written from it only when there is an error (`type`, `events[3].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldPrefix {
    Single,
    Batch(usize),
}

impl FieldPrefix {
    /// The name of one of the event's fields, as an error gives it.
    pub fn field(self, name: &str) -> String {
        match self {
            FieldPrefix::Single => name.to_owned(),
            FieldPrefix::Batch(i) => format!("events[{i}].{name}"),
        }
    }
}

/// A validated contact reference.
#[derive(Debug, Clone)]
pub enum ValidRef {
    /// Created when missing, with the email and phone given alongside.
    External {
        external_id: String,
        email: Option<String>,
        phone: Option<String>,
    },
    Email(String),
    Phone(String),
}

impl ValidRef {
    /// The identity used to resolve a reference once per batch.
    fn key(&self) -> (u8, &str) {
        match self {
            ValidRef::External { external_id, .. } => (0, external_id),
            ValidRef::Email(e) => (1, e),
            ValidRef::Phone(p) => (2, p),
        }
    }
}

/// Validates one event; `at` names its fields in errors (`type`, `events[3].type`).
pub fn validate(
    e: NewEvent,
    tenant: &TenantContext,
    at: FieldPrefix,
) -> Result<ValidEvent, Vec<FieldError>> {
    let mut errors = Errors::new();
    let f = |name: &str| at.field(name);
    // Field names are written out only for an error (check_with): most events have none.
    errors.check_with(|| f("type"), validate::event_type(&e.kind));
    let external_id = e
        .contact
        .external_id
        .as_deref()
        .and_then(|v| errors.check_with(|| f("contact.external_id"), validate::text(v, 255)));
    let email = e
        .contact
        .email
        .as_deref()
        .and_then(|v| errors.check_with(|| f("contact.email"), validate::email(v)));
    let phone = e.contact.phone.as_deref().and_then(|v| {
        errors.check_with(
            || f("contact.phone"),
            validate::phone(v, Some(&tenant.default_country)),
        )
    });
    if e.contact.external_id.is_none() && e.contact.email.is_none() && e.contact.phone.is_none() {
        errors.add(
            f("contact"),
            "give the contact's external_id, email or phone",
        );
    }
    let now = Utc::now();
    let occurred_at = e.occurred_at.unwrap_or(now);
    if occurred_at > now + MAX_FUTURE {
        errors.add(
            f("occurred_at"),
            "must not be more than 24 hours in the future",
        );
    }
    if let Some(key) = &e.idempotency_key {
        if key.is_empty() || key.len() > 255 {
            errors.add(f("idempotency_key"), "must be 1 to 255 characters");
        }
    }
    if !errors.is_empty() {
        return Err(errors.into_vec());
    }
    let contact = match (external_id, email, phone) {
        (Some(external_id), email, phone) => ValidRef::External {
            external_id,
            email,
            phone,
        },
        (None, Some(email), _) => ValidRef::Email(email),
        (None, None, Some(phone)) => ValidRef::Phone(phone),
        (None, None, None) => return Err(vec![FieldError::new(f("contact"), "is required")]),
    };
    Ok(ValidEvent {
        kind: e.kind,
        contact,
        occurred_at,
        properties: Value::Object(e.properties.unwrap_or_default()),
        idempotency_key: e.idempotency_key,
        at,
    })
}

/// What happened to one event.
#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted(Accepted),
    Rejected(Vec<FieldError>),
}

/// A validated event, or why it was rejected.
pub type Item = Result<ValidEvent, Vec<FieldError>>;

/// The fast path of [`ingest`], for events that all name their contact by external id and
/// carry no idempotency key (most traffic), of any tenants: one statement and no transaction
/// around it, when every contact exists. None when they need the full path (a contact is
/// new, an event has a key or names its contact by email or phone): nothing was written then.
pub async fn ingest_known(
    conn: &mut PgConnection,
    items: &[(TenantId, &Item)],
) -> Result<Option<Vec<Outcome>>, sqlx::Error> {
    let mut rows = Vec::with_capacity(items.len());
    for (tenant, item) in items {
        let Ok(valid) = item else { continue };
        let ValidRef::External { external_id, .. } = &valid.contact else {
            return Ok(None);
        };
        if valid.idempotency_key.is_some() {
            return Ok(None);
        }
        rows.push(store::ByExternalId {
            tenant: *tenant,
            external_id,
            kind: &valid.kind,
            occurred_at: valid.occurred_at,
            properties: &valid.properties,
        });
    }
    let Some(appended) = store::append_known(conn, &rows).await? else {
        return Ok(None);
    };
    let mut appended = appended.into_iter();
    let mut outcomes = Vec::with_capacity(items.len());
    for (_, item) in items {
        outcomes.push(match item {
            Err(errors) => Outcome::Rejected(errors.clone()),
            Ok(_) => match appended.next() {
                Some((id, contact_id, ordinal)) => Outcome::Accepted(Accepted {
                    id,
                    contact_id,
                    ordinal,
                    duplicate: false,
                }),
                None => return Err(sqlx::Error::Protocol("an appended event is missing".into())),
            },
        });
    }
    Ok(Some(outcomes))
}

/// Records a tenant's validated events (or carries their validation errors through) in the
/// caller's transaction, with a fixed number of statements whatever their count: the contacts
/// they name are resolved together (the missing ones created together), their idempotency
/// keys locked and looked up together, and the new events appended in one statement.
/// Outcomes are in input order.
pub async fn ingest(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    items: &[&Item],
) -> StoreResult<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
    let valid = || items.iter().filter_map(|i| i.as_ref().ok());
    let resolved = resolve_all(conn, tenant, valid().map(|v| &v.contact)).await?;

    // Idempotency keys: locked, so that no concurrent request records one between our look-up
    // and our insert; then deduplicated against recorded events and earlier items.
    let keys: Vec<&str> = valid()
        .filter_map(|i| i.idempotency_key.as_deref())
        .collect();
    store::lock_idempotency_keys(conn, tenant.id, &keys).await?;
    let recorded = store::by_idempotency_keys(conn, tenant.id, &keys).await?;
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut duplicate_of: Vec<(usize, usize)> = Vec::new();
    let mut rows: Vec<NewEventRow<'_>> = Vec::with_capacity(items.len());
    let mut row_items: Vec<usize> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let valid = match *item {
            Ok(v) => v,
            Err(errors) => {
                outcomes[index] = Some(Outcome::Rejected(errors.clone()));
                continue;
            }
        };
        let contact_id = match resolved.get(&valid.contact.key()) {
            Some(Ok(id)) => *id,
            Some(Err(message)) => {
                let field = match valid.contact {
                    ValidRef::Email(_) => "contact.email",
                    _ => "contact.phone",
                };
                let field = valid.at.field(field);
                outcomes[index] = Some(Outcome::Rejected(vec![FieldError::new(field, *message)]));
                continue;
            }
            None => {
                return Err(StoreError::Internal(anyhow::anyhow!(
                    "unresolved contact reference"
                )));
            }
        };
        if let Some(key) = valid.idempotency_key.as_deref() {
            if let Some(&(id, contact_id, ordinal)) = recorded.get(key) {
                outcomes[index] = Some(duplicate(id, contact_id, ordinal));
                continue;
            }
            if let Some(&first) = first_with_key.get(key) {
                duplicate_of.push((index, first));
                continue;
            }
            first_with_key.insert(key, index);
        }
        rows.push(NewEventRow {
            id: Uuid::now_v7(),
            contact_id,
            kind: &valid.kind,
            occurred_at: valid.occurred_at,
            properties: &valid.properties,
            source: "api",
            idempotency_key: valid.idempotency_key.as_deref(),
            subject: None,
        });
        row_items.push(index);
    }

    let appended = match store::append_all(conn, tenant.id, &rows).await {
        Ok(a) if a.len() == rows.len() => a,
        Ok(_) => {
            return Err(StoreError::Internal(anyhow::anyhow!(
                "an event was not appended"
            )));
        }
        // Only a writer that skipped the key locks can get here; the caller rolls back.
        Err(e) if crate::db::is_unique_violation(&e, Some("events_idempotency_key")) => {
            return Err(StoreError::Unavailable(
                "a concurrent request recorded one of these idempotency keys; retry".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    for ((row, appended), index) in rows.iter().zip(appended).zip(row_items) {
        outcomes[index] = Some(Outcome::Accepted(Accepted {
            id: appended.id,
            contact_id: row.contact_id,
            ordinal: appended.ordinal,
            duplicate: false,
        }));
    }
    for (index, first) in duplicate_of {
        outcomes[index] = match &outcomes[first] {
            Some(Outcome::Accepted(a)) => Some(duplicate(a.id, a.contact_id, a.ordinal)),
            other => other.clone(),
        };
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Internal(anyhow::anyhow!("event without outcome"))))
        .collect()
}

fn duplicate(id: Uuid, contact_id: Uuid, ordinal: i64) -> Outcome {
    Outcome::Accepted(Accepted {
        id,
        contact_id,
        ordinal,
        duplicate: true,
    })
}

/// The contact each distinct reference names, in three queries at most whatever their
/// number; an unknown email or phone is an error message.
async fn resolve_all<'a>(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    refs: impl Iterator<Item = &'a ValidRef>,
) -> StoreResult<HashMap<(u8, &'a str), Result<Uuid, &'static str>>> {
    let mut external: Vec<ExternalRef<'a>> = Vec::new();
    let mut emails: Vec<&'a str> = Vec::new();
    let mut phones: Vec<&'a str> = Vec::new();
    let mut seen: HashSet<(u8, &'a str)> = HashSet::new();
    for r in refs {
        if !seen.insert(r.key()) {
            continue;
        }
        match r {
            ValidRef::External {
                external_id,
                email,
                phone,
            } => external.push(ExternalRef {
                external_id,
                email: email.as_deref(),
                phone: phone.as_deref(),
            }),
            ValidRef::Email(email) => emails.push(email),
            ValidRef::Phone(phone) => phones.push(phone),
        }
    }
    let mut resolved = HashMap::with_capacity(seen.len());
    if !external.is_empty() {
        let ids = contacts::ensure_by_external_ids(conn, tenant.id, &external).await?;
        for r in &external {
            let id = ids.get(r.external_id).copied().ok_or_else(|| {
                StoreError::Internal(anyhow::anyhow!("contact {} not ensured", r.external_id))
            })?;
            resolved.insert((0, r.external_id), Ok(id));
        }
    }
    for (tag, column, values, missing) in [
        (
            1,
            Address::Email,
            &emails,
            "no contact has this email; refer to new contacts by external_id",
        ),
        (
            2,
            Address::Phone,
            &phones,
            "no contact has this phone; refer to new contacts by external_id",
        ),
    ] {
        let ids = contacts::ids_by_address(conn, tenant.id, column, values).await?;
        for v in values {
            resolved.insert((tag, *v), ids.get(*v).copied().ok_or(missing));
        }
    }
    Ok(resolved)
}
