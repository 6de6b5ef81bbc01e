//! `/v1/segments`: named conditions over the contact, their count and their members.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{Segment, SegmentCount, SegmentInput, SegmentPatch};
use super::store;
use crate::AppState;
use crate::contacts::model::Contact;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;
use crate::validate::FieldError;

/// How many contacts one page of `GET /v1/segments/{id}/contacts` looks at, at most: a page
/// may come back short (with a cursor) when few contacts match.
const LIST_BUDGET: u64 = 50_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_segment, list_segments))
        .routes(routes!(get_segment, update_segment, delete_segment))
        .routes(routes!(count_segment))
        .routes(routes!(segment_contacts))
}

fn check_name(name: &str, errors: &mut Vec<FieldError>) {
    let n = name.trim().chars().count();
    if n == 0 || n > 200 {
        errors.push(FieldError::new(
            "name",
            "give the segment a name of 1 to 200 characters",
        ));
    }
}

fn check_condition(source: &str, errors: &mut Vec<FieldError>) {
    if let Err(e) = super::compile(source) {
        errors.push(FieldError::new("condition", e));
    }
}

/// Create a segment. A condition that does not compile is a 422 with its line and column;
/// one that names anything but `contact` and `now`, or could do too much work, is a 422 too.
#[utoipa::path(post, path = "/v1/segments", tag = "segments", security(("api_key" = [])),
    request_body = SegmentInput,
    responses((status = 201, body = Segment), (status = 422, response = ProblemResponse)))]
async fn create_segment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(input): ValidJson<SegmentInput>,
) -> ApiResult<(StatusCode, Json<Segment>)> {
    let mut errors = Vec::new();
    check_name(&input.name, &mut errors);
    check_condition(&input.condition, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let mut conn = state.pool.acquire().await?;
    let segment = store::create(&mut conn, tenant.id, input.name.trim(), &input.condition).await?;
    Ok((StatusCode::CREATED, Json(segment)))
}

/// List segments, newest first.
#[utoipa::path(get, path = "/v1/segments", tag = "segments", security(("api_key" = [])),
    params(PageParams), responses((status = 200, body = Page<Segment>)))]
async fn list_segments(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Segment>>> {
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, before, limit).await?;
    Ok(Json(paginate(rows, limit, |s| encode_id_cursor(s.id))))
}

async fn load(state: &AppState, tenant: &TenantContext, id: Uuid) -> ApiResult<Segment> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .ok_or_else(|| store::not_found(id).into())
}

/// Get a segment.
#[utoipa::path(get, path = "/v1/segments/{id}", tag = "segments", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 200, body = Segment), (status = 404, response = ProblemResponse)))]
async fn get_segment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Segment>> {
    load(&state, &tenant, id).await.map(Json)
}

/// Change a segment's name or condition. Broadcasts already running keep the members they
/// decided on; the next pages they walk use the new condition.
#[utoipa::path(patch, path = "/v1/segments/{id}", tag = "segments", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Segment id")), request_body = SegmentPatch,
    responses((status = 200, body = Segment), (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn update_segment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(patch): ValidJson<SegmentPatch>,
) -> ApiResult<Json<Segment>> {
    let mut errors = Vec::new();
    if let Some(name) = &patch.name {
        check_name(name, &mut errors);
    }
    if let Some(condition) = &patch.condition {
        check_condition(condition, &mut errors);
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let mut conn = state.pool.acquire().await?;
    store::update(
        &mut conn,
        tenant.id,
        id,
        patch.name.as_deref().map(str::trim),
        patch.condition.as_deref(),
    )
    .await?
    .map(Json)
    .ok_or_else(|| store::not_found(id).into())
}

/// Delete a segment; a segment a broadcast names cannot be deleted (409).
#[utoipa::path(delete, path = "/v1/segments/{id}", tag = "segments", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 204), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn delete_segment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let mut tx = crate::db::begin(&state.pool).await?;
    if !store::delete(&mut tx, tenant.id, id).await? {
        return Err(store::not_found(id).into());
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

fn compiled(segment: &Segment) -> ApiResult<crate::campaigns::model::Condition> {
    super::compile(&segment.condition).map_err(|e| {
        ApiError::Unprocessable(format!("the segment's condition no longer compiles: {e}"))
    })
}

/// How many contacts match the segment now. Every live contact of the tenant is walked past,
/// a page of 2,000 at a time (no lock is held and one page is in memory): the database rules
/// out the contacts that fail the condition's plain comparisons (`contact.country == 'HR'`,
/// `contact.attributes.score >= 4`), and the condition runs on the others. A condition with
/// none costs about a second per 100,000-200,000 contacts.
#[utoipa::path(get, path = "/v1/segments/{id}/count", tag = "segments", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 200, body = SegmentCount), (status = 404, response = ProblemResponse)))]
async fn count_segment(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<SegmentCount>> {
    let segment = load(&state, &tenant, id).await?;
    let condition = compiled(&segment)?;
    let started = Instant::now();
    let (count, scanned) = super::count(&state.pool, tenant.id, &condition).await?;
    Ok(Json(SegmentCount {
        segment_id: id,
        count,
        scanned,
        took_ms: started.elapsed().as_millis() as u64,
        counted_at: Utc::now(),
    }))
}

/// `GET /v1/segments/{id}/contacts` parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MemberParams {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// The contacts that match the segment now, in id order. A page looks at up to 50,000
/// contacts: when few match it may hold fewer items than `limit`, with a `next_cursor` to go
/// on; the list is over when `next_cursor` is null.
#[utoipa::path(get, path = "/v1/segments/{id}/contacts", tag = "segments", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Segment id"), MemberParams),
    responses((status = 200, body = Page<Contact>), (status = 404, response = ProblemResponse)))]
async fn segment_contacts(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<MemberParams>,
) -> ApiResult<Json<Page<Contact>>> {
    let page = PageParams {
        limit: params.limit,
        cursor: params.cursor,
    };
    let limit = page.limit()?;
    let after = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let segment = load(&state, &tenant, id).await?;
    let condition = compiled(&segment)?;
    let (data, next) = super::list_members(
        &state.pool,
        tenant.id,
        &condition,
        after,
        limit as usize,
        LIST_BUDGET,
    )
    .await?;
    Ok(Json(Page {
        data,
        next_cursor: next.map(encode_id_cursor),
    }))
}
