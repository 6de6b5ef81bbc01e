//! `/v1/contacts`: upsert, batch, get, list, erase and the timeline (the contact card, which
//! shows tickets, is the support desk's: `support::routes`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{
    Contact, ContactBatch, ContactBatchItem, ContactBatchResult, ContactFilter, ContactInput,
    ItemStatus,
};
use super::store::{self, ItemOutcome, ListFilter, Upserted};
use crate::AppState;
use crate::domain::TenantContext;
use crate::error::StoreError;
use crate::error::{ApiError, ApiResult};
use crate::events::model::{Event, TimelineParams};
use crate::events::store as events;
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{
    Page, PageParams, decode_id_cursor, decode_time_cursor, encode_id_cursor, encode_time_cursor,
    paginate,
};
use crate::http::problems::ProblemResponse;
use crate::validate;

/// Most contacts a batch may carry.
pub const MAX_BATCH: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_contacts))
        .routes(routes!(upsert_contact, get_contact, erase_contact))
        .routes(routes!(batch_upsert))
        .routes(routes!(export_contacts))
        .routes(routes!(timeline))
}

/// Create or update a contact by your own id.
///
/// Absent fields are left as they are; `null` clears a field; attributes merge key by key
/// (a `null` value removes the key); consents merge per channel and purpose.
#[utoipa::path(put, path = "/v1/contacts/{id}", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Your own id for the contact (its `external_id`)")),
    request_body = ContactInput,
    responses(
        (status = 201, description = "Created", body = Contact),
        (status = 200, description = "Updated (or unchanged)", body = Contact),
        (status = 422, response = ProblemResponse),
    ))]
async fn upsert_contact(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(external_id): ApiPath<String>,
    ValidJson(body): ValidJson<ContactInput>,
) -> ApiResult<impl IntoResponse> {
    let external_id =
        validate::text(&external_id, 255).map_err(|m| ApiError::field("external_id", m))?;
    if body
        .external_id
        .as_deref()
        .is_some_and(|b| b != external_id)
    {
        return Err(ApiError::field(
            "external_id",
            "differs from the external id in the path",
        ));
    }
    let changes = body
        .validate("", &tenant.default_country)
        .map_err(ApiError::validation)?;
    let upserted = state
        .contact_writes
        .upsert(tenant, external_id, changes)
        .await?;
    Ok(match upserted {
        Upserted::Created(c) => (StatusCode::CREATED, Json(c)),
        Upserted::Updated(c) | Upserted::Unchanged(c) => (StatusCode::OK, Json(c)),
    })
}

/// Create or update up to 1,000 contacts; one bad item does not fail the others.
#[utoipa::path(post, path = "/v1/contacts/batch", tag = "contacts",
    security(("api_key" = [])),
    request_body = ContactBatch,
    responses((status = 200, description = "Per-item results, in request order", body = ContactBatchResult),
              (status = 422, response = ProblemResponse)))]
async fn batch_upsert(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<ContactBatch>,
) -> ApiResult<Json<ContactBatchResult>> {
    if body.contacts.is_empty() || body.contacts.len() > MAX_BATCH {
        return Err(ApiError::field(
            "contacts",
            format!("must hold 1 to {MAX_BATCH} contacts"),
        ));
    }
    let mut results: Vec<Option<ContactBatchItem>> = Vec::with_capacity(body.contacts.len());
    let mut valid = Vec::new();
    for (index, item) in body.contacts.iter().enumerate() {
        let prefix = format!("contacts[{index}].");
        let external_id = match item.external_id.as_deref().map(|v| validate::text(v, 255)) {
            Some(Ok(id)) => Some(id),
            Some(Err(m)) => {
                results.push(Some(rejected(index, format!("{prefix}external_id"), m)));
                continue;
            }
            None => {
                results.push(Some(rejected(
                    index,
                    format!("{prefix}external_id"),
                    "is required".into(),
                )));
                continue;
            }
        };
        match item.validate(&prefix, &tenant.default_country) {
            Ok(changes) => {
                valid.push((external_id.unwrap_or_default(), index, changes));
                results.push(None);
            }
            Err(errors) => results.push(Some(ContactBatchItem {
                index,
                status: ItemStatus::Rejected,
                contact: None,
                errors: Some(errors),
            })),
        }
    }
    // One statement per step for the whole batch (see `store::upsert_many`).
    let items: Vec<store::BatchItem<'_>> = valid
        .iter()
        .map(|(external_id, index, changes)| store::BatchItem {
            external_id,
            field_prefix: format!("contacts[{index}]."),
            changes,
        })
        .collect();
    let mut tx = crate::db::begin(&state.pool).await?;
    let outcomes =
        store::upsert_many(&mut tx, &tenant, &items, "upsert", store::WriteMode::Upsert).await?;
    let ids: Vec<Uuid> = outcomes.iter().filter_map(ItemOutcome::id).collect();
    let contacts: std::collections::HashMap<Uuid, Contact> =
        store::get_many(&mut tx, tenant.id, &ids)
            .await?
            .into_iter()
            .map(|c| (c.id, c))
            .collect();
    tx.commit().await?;
    for ((_, index, _), outcome) in valid.iter().zip(outcomes) {
        let contact = |id: Uuid| {
            contacts.get(&id).cloned().ok_or_else(|| {
                ApiError::from(StoreError::Internal(anyhow::anyhow!(
                    "contact {id} vanished"
                )))
            })
        };
        results[*index] = Some(match outcome {
            ItemOutcome::Created(id) => accepted(*index, ItemStatus::Created, contact(id)?),
            ItemOutcome::Updated(id) => accepted(*index, ItemStatus::Updated, contact(id)?),
            ItemOutcome::Unchanged(id) => accepted(*index, ItemStatus::Unchanged, contact(id)?),
            ItemOutcome::Rejected(errors) => ContactBatchItem {
                index: *index,
                status: ItemStatus::Rejected,
                contact: None,
                errors: Some(errors),
            },
            ItemOutcome::Skipped(_) => {
                return Err(ApiError::from(StoreError::Internal(anyhow::anyhow!(
                    "an upsert batch skipped an item"
                ))));
            }
        });
    }
    let results: Vec<ContactBatchItem> = results.into_iter().flatten().collect();
    let count = |s: ItemStatus| results.iter().filter(|r| r.status == s).count();
    Ok(Json(ContactBatchResult {
        created: count(ItemStatus::Created),
        updated: count(ItemStatus::Updated),
        unchanged: count(ItemStatus::Unchanged),
        rejected: count(ItemStatus::Rejected),
        results,
    }))
}

fn rejected(index: usize, field: String, message: String) -> ContactBatchItem {
    ContactBatchItem {
        index,
        status: ItemStatus::Rejected,
        contact: None,
        errors: Some(vec![crate::validate::FieldError::new(field, message)]),
    }
}

fn accepted(index: usize, status: ItemStatus, contact: Contact) -> ContactBatchItem {
    ContactBatchItem {
        index,
        status,
        contact: Some(contact),
        errors: None,
    }
}

/// Get a contact.
#[utoipa::path(get, path = "/v1/contacts/{id}", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Contact id")),
    responses((status = 200, body = Contact), (status = 404, response = ProblemResponse)))]
async fn get_contact(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Contact>> {
    let id = parse_id(&id)?;
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| contact_not_found(id))
}

/// The path segment is an external id for PUT and a contact id elsewhere; the router cannot
/// tell them apart, so the handlers parse the id themselves.
fn parse_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::BadRequest(format!(
            "`{raw}` is not a contact id (a UUID); to find a contact by your own id use \
             GET /v1/contacts?external_id={raw}"
        ))
    })
}

pub fn contact_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no contact with id {id}"))
}

/// The filters of a list, normalised for the store.
fn list_filter(
    tenant: &TenantContext,
    email: Option<&str>,
    phone: Option<&str>,
    external_id: Option<&str>,
) -> ApiResult<ListFilter> {
    Ok(ListFilter {
        email: email
            .map(validate::email)
            .transpose()
            .map_err(|m| ApiError::field("email", m))?,
        phone: phone
            .map(|p| validate::phone(p, Some(&tenant.default_country)))
            .transpose()
            .map_err(|m| ApiError::field("phone", m))?,
        external_id: external_id
            .map(|x| {
                // PostgreSQL text cannot hold NUL: a 422 now, not a failed query later (an
                // export has answered 200 by then).
                if x.contains('\0') {
                    Err(ApiError::field("external_id", "must not contain NUL"))
                } else {
                    Ok(x.to_owned())
                }
            })
            .transpose()?,
    })
}

/// `GET /v1/contacts/export`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    /// `ndjson` (default): one contact per line, as `GET /v1/contacts/{id}` shows it; `csv`:
    /// a header row, then one row per contact, with a column per consent
    /// (`consents.<channel>.<purpose>`) and per attribute any contact has
    /// (`attributes.<name>`).
    #[param(inline)]
    pub format: Option<super::export::Format>,
    pub email: Option<String>,
    /// Any common format.
    pub phone: Option<String>,
    pub external_id: Option<String>,
}

/// Export every contact (backups, moving to another tool): streamed, in id order, in constant
/// memory however many there are; the same filters as the list.
#[utoipa::path(get, path = "/v1/contacts/export", tag = "contacts",
    security(("api_key" = [])),
    params(ExportParams),
    responses((status = 200, description = "Every matching contact",
               content((String = "application/x-ndjson"), (String = "text/csv"))),
              (status = 400, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn export_contacts(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ExportParams>,
) -> ApiResult<axum::response::Response> {
    let filter = list_filter(
        &tenant,
        params.email.as_deref(),
        params.phone.as_deref(),
        params.external_id.as_deref(),
    )?;
    let format = params.format.unwrap_or(super::export::Format::Ndjson);
    let body = super::export::stream(state.pool.clone(), tenant.id, filter, format).await?;
    let name = match format {
        super::export::Format::Ndjson => "attachment; filename=\"contacts.ndjson\"",
        super::export::Format::Csv => "attachment; filename=\"contacts.csv\"",
    };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, format.content_type()),
            (axum::http::header::CONTENT_DISPOSITION, name),
        ],
        body,
    )
        .into_response())
}

/// List contacts, newest first, optionally by email, phone or external id.
#[utoipa::path(get, path = "/v1/contacts", tag = "contacts",
    security(("api_key" = [])),
    params(ContactFilter),
    responses((status = 200, body = Page<Contact>), (status = 422, response = ProblemResponse)))]
async fn list_contacts(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<ContactFilter>,
) -> ApiResult<Json<Page<Contact>>> {
    let page = PageParams {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let list_filter = list_filter(
        &tenant,
        filter.email.as_deref(),
        filter.phone.as_deref(),
        filter.external_id.as_deref(),
    )?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, &list_filter, before, limit).await?;
    Ok(Json(paginate(rows, limit, |c| encode_id_cursor(c.id))))
}

/// Erase a contact (right to erasure): personal data is removed from the contact, its events,
/// messages (addresses, texts, provider reasons), tickets and their messages, ratings'
/// comments, calls (numbers, recordings) and stored idempotent responses; counts, statuses and
/// times are kept for reports.
#[utoipa::path(delete, path = "/v1/contacts/{id}", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Contact id")),
    responses((status = 204, description = "Erased"), (status = 404, response = ProblemResponse)))]
async fn erase_contact(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id)?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let Some(contact) = store::get(&mut tx, tenant.id, id).await? else {
        return Err(contact_not_found(id));
    };
    if !store::erase(&mut tx, tenant.id, id).await? {
        return Err(contact_not_found(id));
    }
    // Everywhere the person was copied, in one transaction: all of it or none.
    for erase in state.erasers.iter() {
        erase(&mut tx, tenant.id, id).await?;
    }
    let needles: Vec<String> = [
        Some(id.to_string()),
        contact.external_id,
        contact.email,
        contact.phone,
        contact.viber_id,
    ]
    .into_iter()
    .flatten()
    .collect();
    crate::http::idempotency::forget_mentions(&mut tx, tenant.id, &needles).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The contact's timeline: every event, newest first.
#[utoipa::path(get, path = "/v1/contacts/{id}/timeline", tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Contact id"), TimelineParams),
    responses((status = 200, body = Page<Event>), (status = 404, response = ProblemResponse)))]
async fn timeline(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<TimelineParams>,
) -> ApiResult<Json<Page<Event>>> {
    let page = PageParams {
        limit: params.limit,
        cursor: params.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_time_cursor).transpose()?;
    // A filter no event can have is a mistake (`Purchase.Completed`), not an empty page.
    if let Some(kind) = &params.kind {
        crate::validate::event_type(kind).map_err(ApiError::BadRequest)?;
    }
    let mut conn = state.pool.acquire().await?;
    if store::get(&mut conn, tenant.id, id).await?.is_none() {
        return Err(contact_not_found(id));
    }
    let rows = events::timeline(
        &mut conn,
        tenant.id,
        id,
        params.kind.as_deref(),
        before,
        limit,
    )
    .await?;
    Ok(Json(paginate(rows, limit, |e| {
        encode_time_cursor(e.occurred_at, e.id)
    })))
}
