//! `/admin/v1/tenants`: operators create tenants and their API keys.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{ApiKey, CreatedApiKey, NewApiKey, NewTenant, Tenant};
use super::store;
use crate::AppState;
use crate::domain::Operator;
use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_tenant, list_tenants))
        .routes(routes!(get_tenant))
        .routes(routes!(create_api_key, list_api_keys))
        .routes(routes!(revoke_api_key))
}

/// Create a tenant.
#[utoipa::path(post, path = "/admin/v1/tenants", tag = "admin",
    security(("admin_token" = [])),
    request_body = NewTenant,
    responses(
        (status = 201, body = Tenant),
        (status = 409, description = "The slug is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, response = ProblemResponse),
    ))]
async fn create_tenant(
    _: Operator,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<NewTenant>,
) -> ApiResult<impl IntoResponse> {
    let valid = body.validate()?;
    let mut conn = state.pool.acquire().await?;
    let tenant = store::create(&mut conn, &valid).await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// List tenants, newest first.
#[utoipa::path(get, path = "/admin/v1/tenants", tag = "admin",
    security(("admin_token" = [])),
    params(PageParams),
    responses((status = 200, body = Page<Tenant>)))]
async fn list_tenants(
    _: Operator,
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> ApiResult<Json<Page<Tenant>>> {
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, before, limit).await?;
    Ok(Json(paginate(rows, limit, |t| encode_id_cursor(t.id))))
}

/// Get a tenant.
#[utoipa::path(get, path = "/admin/v1/tenants/{id}", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "Tenant id")),
    responses((status = 200, body = Tenant), (status = 404, response = ProblemResponse)))]
async fn get_tenant(
    _: Operator,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Tenant>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| tenant_not_found(id))
}

fn tenant_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no tenant with id {id}"))
}

/// Create an API key for a tenant; the key is in this answer only.
#[utoipa::path(post, path = "/admin/v1/tenants/{id}/api-keys", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "Tenant id")),
    request_body = NewApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 404, response = ProblemResponse)))]
async fn create_api_key(
    _: Operator,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ValidJson(body): ValidJson<NewApiKey>,
) -> ApiResult<impl IntoResponse> {
    let name = validate::text(&body.name, 200).map_err(|m| ApiError::field("name", m))?;
    let mut tx = crate::db::begin(&state.pool).await?;
    if store::get(&mut tx, id).await?.is_none() {
        return Err(tenant_not_found(id));
    }
    let created = store::create_key(&mut tx, TenantId(id), &name).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// List a tenant's API keys (without the secrets).
#[utoipa::path(get, path = "/admin/v1/tenants/{id}/api-keys", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "Tenant id")),
    responses((status = 200, body = Page<ApiKey>), (status = 404, response = ProblemResponse)))]
async fn list_api_keys(
    _: Operator,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Page<ApiKey>>> {
    let mut conn = state.pool.acquire().await?;
    if store::get(&mut conn, id).await?.is_none() {
        return Err(tenant_not_found(id));
    }
    let keys = store::list_keys(&mut conn, TenantId(id)).await?;
    Ok(Json(Page {
        data: keys,
        next_cursor: None,
    }))
}

/// Revoke an API key at once.
#[utoipa::path(delete, path = "/admin/v1/tenants/{id}/api-keys/{key_id}", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key id")),
    responses((status = 204, description = "Revoked"), (status = 404, response = ProblemResponse)))]
async fn revoke_api_key(
    _: Operator,
    State(state): State<AppState>,
    ApiPath((id, key_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let mut conn = state.pool.acquire().await?;
    if store::revoke_key(&mut conn, TenantId(id), key_id).await? {
        // Other processes hear of it from the database; this one forgets at once.
        state.api_keys.invalidate();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "tenant {id} has no API key with id {key_id}"
        )))
    }
}
