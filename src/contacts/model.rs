//! Contact types and the validation of what merchants send.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{Channel, ConsentInput, Consents, Patch, Purpose};
use crate::validate::{self, Errors, FieldError};

/// A customer of a tenant.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Contact {
    pub id: Uuid,
    /// The tenant's own id for this customer; unique per tenant.
    pub external_id: Option<String>,
    pub email: Option<String>,
    /// E.164.
    pub phone: Option<String>,
    pub viber_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub locale: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    /// IANA time zone.
    pub timezone: Option<String>,
    pub birthday: Option<NaiveDate>,
    /// The contact's personal advisor.
    pub owner_agent_id: Option<Uuid>,
    /// Free attributes: credit_limit, available_credit, plan, segment...
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// Per channel and purpose: `{"email": {"marketing": {"status": "opted_in", "at": ..., "source": ...}}}`.
    #[schema(value_type = Object)]
    #[sqlx(json)]
    pub consents: Consents,
    /// How many events of each type the contact has: `{"purchase.completed": 2}`.
    #[schema(value_type = Object, example = json!({"purchase.completed": 2}))]
    pub stats: Value,
    /// When the contact's latest event of each type happened:
    /// `{"purchase.completed": "2026-11-30T09:12:00Z"}`.
    #[schema(value_type = Object, example = json!({"purchase.completed": "2026-11-30T09:12:00Z"}))]
    pub last_event_at: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The body of `PUT /v1/contacts/{external_id}` and an item of a batch upsert. Absent fields are
/// left as they are; `null` clears a field; `attributes` merge key by key (a `null` value
/// removes the key); `consents` merge per channel and purpose.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactInput {
    /// Required in a batch; in `PUT` the path gives it (and a body value must match).
    pub external_id: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "ana@example.com")]
    pub email: Patch<String>,
    /// Any common format; national numbers use the contact's or the tenant's country.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "091 234 5678")]
    pub phone: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub viber_id: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "Ana")]
    pub first_name: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "Horvat")]
    pub last_name: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "hr")]
    pub locale: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "HR")]
    pub country: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "Europe/Zagreb")]
    pub timezone: Patch<String>,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Date, example = "1990-04-17")]
    pub birthday: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<Uuid>)]
    pub owner_agent_id: Patch<Uuid>,
    #[schema(value_type = Option<Object>, example = json!({"credit_limit": 5000, "available_credit": 4200}))]
    pub attributes: Option<Map<String, Value>>,
    #[schema(value_type = Option<Object>, example = json!({"email": {"marketing": "opted_in"}, "sms": {"marketing": "opted_out"}}))]
    pub consents: Option<BTreeMap<String, BTreeMap<String, ConsentInput>>>,
}

/// A validated [`ContactInput`]. The phone is normalised later, once the contact's country
/// is known.
#[derive(Debug, Clone, Default)]
pub struct ContactChanges {
    pub email: Patch<String>,
    pub phone: Patch<String>,
    pub viber_id: Patch<String>,
    pub first_name: Patch<String>,
    pub last_name: Patch<String>,
    pub locale: Patch<String>,
    pub country: Patch<String>,
    pub timezone: Patch<String>,
    pub birthday: Patch<NaiveDate>,
    pub owner_agent_id: Patch<Uuid>,
    pub attributes: Map<String, Value>,
    pub consents: Vec<(Channel, Purpose, ConsentInput)>,
    /// Where consents without a source of their own come from: `api` unless set (an import
    /// says `import:<file>`).
    pub consent_source: Option<String>,
}

const MAX_TEXT: usize = 255;
pub const MAX_ATTRIBUTES: usize = 200;

fn bounded(max: usize) -> impl Fn(&String) -> Result<String, String> {
    move |v| validate::text(v, max)
}

fn birthday(raw: &String) -> Result<NaiveDate, String> {
    let date = NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
        .map_err(|_| format!("`{raw}` is not a date in YYYY-MM-DD form"))?;
    if date > Utc::now().date_naive() {
        return Err("a birthday cannot be in the future".to_owned());
    }
    Ok(date)
}

impl ContactInput {
    /// Validates every field; `prefix` is put before field names (`contacts[3].`). The phone
    /// is normalised later, with the contact's stored country; but when other fields are
    /// invalid it is checked here too (with the given or the tenant's country), so that the
    /// answer lists every error at once.
    pub fn validate(
        &self,
        prefix: &str,
        default_country: &str,
    ) -> Result<ContactChanges, Vec<FieldError>> {
        self.clone().into_changes(prefix, default_country)
    }

    /// [`validate`](Self::validate), taking the input (its attributes and consents move into
    /// the changes instead of being copied: an import validates a million of them).
    pub fn into_changes(
        mut self,
        prefix: &str,
        default_country: &str,
    ) -> Result<ContactChanges, Vec<FieldError>> {
        let mut errors = Errors::new();
        let f = |name: &str| format!("{prefix}{name}");
        let mut take = |name: &str, r: Result<Patch<String>, String>| {
            errors.check_with(|| f(name), r).unwrap_or_default()
        };
        let email = take("email", self.email.try_map(|v| validate::email(v)));
        let phone = take("phone", self.phone.try_map(bounded(40)));
        let viber_id = take("viber_id", self.viber_id.try_map(bounded(MAX_TEXT)));
        let first_name = take("first_name", self.first_name.try_map(bounded(MAX_TEXT)));
        let last_name = take("last_name", self.last_name.try_map(bounded(MAX_TEXT)));
        let locale = take("locale", self.locale.try_map(|v| validate::locale(v)));
        let country = take("country", self.country.try_map(|v| validate::country(v)));
        let timezone = take("timezone", self.timezone.try_map(|v| validate::timezone(v)));
        let birthday = errors
            .check(&f("birthday"), self.birthday.try_map(birthday))
            .unwrap_or_default();
        let attributes = self.attributes.take().unwrap_or_default();
        if attributes.len() > MAX_ATTRIBUTES {
            errors.add(
                f("attributes"),
                format!("at most {MAX_ATTRIBUTES} attributes per request"),
            );
        }
        for key in attributes.keys() {
            if key.is_empty() || key.len() > 100 {
                errors.add(
                    f("attributes"),
                    format!("attribute name `{key}` must be 1-100 characters"),
                );
            }
        }
        let mut consents = Vec::new();
        for (channel_name, purposes) in self.consents.take().into_iter().flatten() {
            let Some(channel) = Channel::parse(&channel_name) else {
                errors.add(
                    f(&format!("consents.{channel_name}")),
                    format!("unknown channel `{channel_name}`; expected email, sms or viber"),
                );
                continue;
            };
            for (purpose_name, consent) in purposes {
                let field = || f(&format!("consents.{channel_name}.{purpose_name}"));
                let Some(purpose) = Purpose::parse(&purpose_name) else {
                    errors.add(
                        field(),
                        format!(
                            "unknown purpose `{purpose_name}`; expected marketing or transactional"
                        ),
                    );
                    continue;
                };
                if consent
                    .at
                    .is_some_and(|at| at > Utc::now() + chrono::Duration::minutes(5))
                {
                    errors.add(
                        format!("{}.at", field()),
                        "a consent cannot be given in the future",
                    );
                }
                consents.push((channel, purpose, consent));
            }
        }
        if !errors.is_empty() {
            if let Patch::Value(raw) = &phone {
                let region = match &country {
                    Patch::Value(c) => c.as_str(),
                    _ => default_country,
                };
                if let Err(message) = validate::phone(raw, Some(region)) {
                    errors.add(f("phone"), message);
                }
            }
            return Err(errors.into_vec());
        }
        Ok(ContactChanges {
            email,
            phone,
            viber_id,
            first_name,
            last_name,
            locale,
            country,
            timezone,
            birthday,
            owner_agent_id: self.owner_agent_id.clone(),
            attributes,
            consents,
            consent_source: None,
        })
    }
}

/// `POST /v1/contacts/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactBatch {
    /// Up to 1,000 contacts, each with its `external_id`.
    pub contacts: Vec<ContactInput>,
}

/// What happened to one item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Created,
    Updated,
    Unchanged,
    Rejected,
}

/// The result of one item of a contact batch, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactBatchItem {
    pub index: usize,
    pub status: ItemStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact: Option<Contact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// The answer to a contact batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactBatchResult {
    pub results: Vec<ContactBatchItem>,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub rejected: usize,
}

/// Filters of `GET /v1/contacts`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ContactFilter {
    pub email: Option<String>,
    /// Any common format.
    pub phone: Option<String>,
    pub external_id: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// `GET /v1/contacts/lookup?phone=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LookupParams {
    /// The caller's number, any common format.
    pub phone: String,
}

/// The current values of a contact's writable fields, to merge changes into and diff.
#[derive(Debug, Clone, PartialEq, Default, sqlx::FromRow)]
pub struct ContactFields {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub viber_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub locale: Option<String>,
    pub country: Option<String>,
    pub timezone: Option<String>,
    pub birthday: Option<NaiveDate>,
    pub owner_agent_id: Option<Uuid>,
    pub attributes: Value,
    #[sqlx(json)]
    pub consents: Consents,
}

/// One changed field: `{"old": ..., "new": ...}` in `contact.updated` events.
pub fn change(old: Value, new: Value) -> Value {
    serde_json::json!({"old": old, "new": new})
}
