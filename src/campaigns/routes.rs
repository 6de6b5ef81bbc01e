//! `/v1/campaigns`: write a rule once, activate it, watch what it does.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{
    Campaign, CampaignStats, CampaignStatus, Definition, JourneyStatus, JourneyView,
};
use super::store;
use crate::AppState;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson, parse_json};
use crate::http::pagination::{Page, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_campaign, list_campaigns))
        .routes(routes!(get_campaign, update_campaign))
        .routes(routes!(activate))
        .routes(routes!(pause))
        .routes(routes!(archive))
        .routes(routes!(stats))
        .routes(routes!(journeys))
}

/// `GET /v1/campaigns` filters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CampaignFilter {
    /// `draft`, `active`, `paused` or `archived`.
    pub status: Option<CampaignStatus>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// `GET /v1/campaigns/{id}/journeys` filters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JourneyFilter {
    /// `active`, `completed` or `exited`.
    pub status: Option<JourneyStatus>,
    pub contact_id: Option<Uuid>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// Create a campaign (a draft); it runs once activated. A campaign that cannot run is a 422
/// naming the field: an unknown template or channel, a condition that does not compile (with
/// its line and column), steps that cannot end.
#[utoipa::path(post, path = "/v1/campaigns", tag = "campaigns", security(("api_key" = [])),
    request_body = Definition,
    responses((status = 201, body = Campaign),
              (status = 422, response = ProblemResponse)))]
async fn create_campaign(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(def): ValidJson<Definition>,
) -> ApiResult<(StatusCode, Json<Campaign>)> {
    def.check().map_err(ApiError::validation)?;
    let mut tx = crate::db::begin(&state.pool).await?;
    store::check_templates(&mut tx, tenant.id, &def).await?;
    store::check_audience(&mut tx, tenant.id, &def).await?;
    let campaign = store::create(&mut tx, tenant.id, &def).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(campaign)))
}

/// List campaigns, newest first.
#[utoipa::path(get, path = "/v1/campaigns", tag = "campaigns", security(("api_key" = [])),
    params(CampaignFilter), responses((status = 200, body = Page<Campaign>)))]
async fn list_campaigns(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<CampaignFilter>,
) -> ApiResult<Json<Page<Campaign>>> {
    let page = crate::http::pagination::PageParams {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, filter.status, before, limit).await?;
    Ok(Json(paginate(rows, limit, |c| encode_id_cursor(c.id))))
}

/// Get a campaign with its current definition.
#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, body = Campaign), (status = 404, response = ProblemResponse)))]
async fn get_campaign(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Campaign>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::from(store::campaign_not_found(id)))
}

/// Change a campaign: send any top-level fields of the definition (`null` removes an optional
/// one). The result is a new version; journeys already running keep the version they started
/// on.
#[utoipa::path(patch, path = "/v1/campaigns/{id}", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")), request_body = Definition,
    responses((status = 200, body = Campaign), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn update_campaign(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(patch): ValidJson<Map<String, Value>>,
) -> ApiResult<Json<Campaign>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let status = store::lock(&mut tx, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::from(store::campaign_not_found(id)))?;
    if status == CampaignStatus::Archived {
        return Err(ApiError::Conflict(
            "an archived campaign cannot change; create a new one".to_owned(),
        ));
    }
    let current = store::get(&mut tx, tenant.id, id)
        .await?
        .ok_or_else(|| ApiError::from(store::campaign_not_found(id)))?;
    let mut merged = match serde_json::to_value(&current.definition) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            merged.remove(&key);
        } else {
            merged.insert(key, value);
        }
    }
    let bytes = Bytes::from(serde_json::to_vec(&Value::Object(merged)).unwrap_or_default());
    let def: Definition = parse_json(&bytes)?;
    def.check().map_err(ApiError::validation)?;
    store::check_templates(&mut tx, tenant.id, &def).await?;
    store::check_audience(&mut tx, tenant.id, &def).await?;
    let campaign = store::update(&mut tx, tenant.id, id, &def).await?;
    tx.commit().await?;
    Ok(Json(campaign))
}

async fn change_status(
    state: &AppState,
    tenant: &TenantContext,
    id: Uuid,
    next: CampaignStatus,
) -> ApiResult<Json<Campaign>> {
    let mut tx = crate::db::begin(&state.pool).await?;
    let campaign = store::set_status(&mut tx, tenant.id, id, next, state.clock.now()).await?;
    tx.commit().await?;
    Ok(Json(campaign))
}

/// Start (or resume) enrolling contacts and running journeys. Events from now on count;
/// activation is not retroactive.
#[utoipa::path(post, path = "/v1/campaigns/{id}/activate", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, body = Campaign), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn activate(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Campaign>> {
    change_status(&state, &tenant, id, CampaignStatus::Active).await
}

/// Stop enrolling and sending; journeys wait where they are (exit_on events still end them)
/// and go on when the campaign is activated again.
#[utoipa::path(post, path = "/v1/campaigns/{id}/pause", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, body = Campaign), (status = 404, response = ProblemResponse),
              (status = 409, response = ProblemResponse)))]
async fn pause(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Campaign>> {
    change_status(&state, &tenant, id, CampaignStatus::Paused).await
}

/// End a campaign for good: running journeys exit with reason `campaign_archived`.
#[utoipa::path(post, path = "/v1/campaigns/{id}/archive", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, body = Campaign), (status = 404, response = ProblemResponse)))]
async fn archive(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Campaign>> {
    change_status(&state, &tenant, id, CampaignStatus::Archived).await
}

/// What a campaign did: journeys enrolled, active, completed, exited and converted; messages
/// sent per channel, delivered, opened, clicked, failed, and suppressed per reason.
#[utoipa::path(get, path = "/v1/campaigns/{id}/stats", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, body = CampaignStats), (status = 404, response = ProblemResponse)))]
async fn stats(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<CampaignStats>> {
    let mut conn = state.pool.acquire().await?;
    if store::get(&mut conn, tenant.id, id).await?.is_none() {
        return Err(ApiError::from(store::campaign_not_found(id)));
    }
    Ok(Json(store::stats(&mut conn, tenant.id, id).await?))
}

/// A campaign's journeys, newest first: where each contact stands and why it ended.
#[utoipa::path(get, path = "/v1/campaigns/{id}/journeys", tag = "campaigns", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Campaign id"), JourneyFilter),
    responses((status = 200, body = Page<JourneyView>), (status = 404, response = ProblemResponse)))]
async fn journeys(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(filter): ApiQuery<JourneyFilter>,
) -> ApiResult<Json<Page<JourneyView>>> {
    let page = crate::http::pagination::PageParams {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    if store::get(&mut conn, tenant.id, id).await?.is_none() {
        return Err(ApiError::from(store::campaign_not_found(id)));
    }
    let rows = store::list_journeys(
        &mut conn,
        tenant.id,
        id,
        filter.status,
        filter.contact_id,
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(paginate(rows, limit, |j| encode_id_cursor(j.id))))
}
