//! Event ingestion: validate, resolve contacts, deduplicate, append with exact ordinals.
//!
//! A batch runs in one transaction. Contacts are resolved in a sorted order and counters are
//! bumped in (contact, type) order, so two concurrent batches take their locks in the same order
//! and cannot deadlock; events of one contact and type keep their order within the batch.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{Accepted, NewEvent};
use super::store::{self, NewEventRow};
use crate::contacts::store::{self as contacts, Address};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::http::extract::Errors;
use crate::tenancy::Tenant;
use crate::validate;

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

/// Validates one event; `prefix` is put before field names (`events[3].`).
pub fn validate(
    e: &NewEvent,
    tenant: &Tenant,
    prefix: &str,
) -> Result<ValidEvent, Vec<FieldError>> {
    let mut errors = Errors::new();
    let f = |name: &str| format!("{prefix}{name}");
    errors.check(&f("type"), validate::event_type(&e.kind));
    let external_id = e
        .contact
        .external_id
        .as_deref()
        .and_then(|v| errors.check(&f("contact.external_id"), validate::text(v, 255)));
    let email = e
        .contact
        .email
        .as_deref()
        .and_then(|v| errors.check(&f("contact.email"), validate::email(v)));
    let phone = e.contact.phone.as_deref().and_then(|v| {
        errors.check(
            &f("contact.phone"),
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
        kind: e.kind.clone(),
        contact,
        occurred_at,
        properties: Value::Object(e.properties.clone().unwrap_or_default()),
        idempotency_key: e.idempotency_key.clone(),
    })
}

/// What happened to one event.
#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted(Accepted),
    Rejected(Vec<FieldError>),
}

/// Records validated events (or carries their validation errors through), in one transaction
/// the caller commits. Outcomes are in input order.
pub async fn ingest(
    conn: &mut PgConnection,
    tenant: &Tenant,
    items: Vec<Result<ValidEvent, Vec<FieldError>>>,
    field_prefix: impl Fn(usize) -> String,
) -> ApiResult<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];

    // 1. Resolve each distinct contact once, in a stable order.
    let mut refs: BTreeMap<(u8, &str), &ValidRef> = BTreeMap::new();
    for item in items.iter().flatten() {
        refs.entry(item.contact.key()).or_insert(&item.contact);
    }
    let mut resolved: HashMap<(u8, &str), Result<Uuid, &'static str>> = HashMap::new();
    for (key, r) in &refs {
        resolved.insert(*key, resolve(conn, tenant, r).await?);
    }

    // 2. Deduplicate on idempotency keys: recorded before, or earlier in this batch.
    let keys: Vec<String> = items
        .iter()
        .flatten()
        .filter_map(|i| i.idempotency_key.clone())
        .collect();
    let recorded = store::by_idempotency_keys(conn, tenant.id, &keys).await?;
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut duplicate_of: HashMap<usize, usize> = HashMap::new();
    let mut todo: Vec<(Uuid, &str, usize)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let valid = match item {
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
                let field = format!("{}{field}", field_prefix(index));
                outcomes[index] = Some(Outcome::Rejected(vec![FieldError::new(field, *message)]));
                continue;
            }
            None => {
                return Err(ApiError::Internal(anyhow::anyhow!(
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
                duplicate_of.insert(index, first);
                continue;
            }
            first_with_key.insert(key, index);
        }
        todo.push((contact_id, valid.kind.as_str(), index));
    }

    // 3. Append in (contact, type, position) order.
    todo.sort();
    for (contact_id, kind, index) in todo {
        let Ok(valid) = &items[index] else { continue };
        let row = NewEventRow {
            id: Uuid::now_v7(),
            contact_id,
            kind,
            occurred_at: valid.occurred_at,
            properties: &valid.properties,
            source: "api",
            idempotency_key: valid.idempotency_key.as_deref(),
            subject: None,
        };
        outcomes[index] = Some(match store::append(conn, tenant.id, &row).await? {
            Some(appended) => Outcome::Accepted(Accepted {
                id: appended.id,
                contact_id,
                ordinal: appended.ordinal,
                duplicate: false,
            }),
            None => {
                // Recorded by a concurrent request after our look-up.
                let key = valid.idempotency_key.clone().unwrap_or_default();
                let found = store::by_idempotency_keys(conn, tenant.id, &[key]).await?;
                match found.into_values().next() {
                    Some((id, contact_id, ordinal)) => duplicate(id, contact_id, ordinal),
                    None => {
                        return Err(ApiError::Unavailable(
                            "a concurrent request holds this idempotency key; retry".into(),
                        ));
                    }
                }
            }
        });
    }
    for (index, first) in duplicate_of {
        outcomes[index] = match &outcomes[first] {
            Some(Outcome::Accepted(a)) => Some(duplicate(a.id, a.contact_id, a.ordinal)),
            other => other.clone(),
        };
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("event without outcome"))))
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

/// The contact an event refers to; an unknown email or phone is an error message.
async fn resolve(
    conn: &mut PgConnection,
    tenant: &Tenant,
    r: &ValidRef,
) -> ApiResult<Result<Uuid, &'static str>> {
    Ok(match r {
        ValidRef::External {
            external_id,
            email,
            phone,
        } => Ok(contacts::ensure_by_external_id(
            conn,
            tenant.id,
            external_id,
            email.as_deref(),
            phone.as_deref(),
        )
        .await?),
        ValidRef::Email(email) => contacts::id_by_address(conn, tenant.id, Address::Email, email)
            .await?
            .ok_or("no contact has this email; refer to new contacts by external_id"),
        ValidRef::Phone(phone) => contacts::id_by_address(conn, tenant.id, Address::Phone, phone)
            .await?
            .ok_or("no contact has this phone; refer to new contacts by external_id"),
    })
}
