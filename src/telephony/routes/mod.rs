//! The telephony API: `/v1/calls`, `/v1/integrations/aircall`, and the providers' webhooks
//! (`aircall`, `neutral`).

pub mod aircall;
pub mod neutral;

use axum::Json;
use axum::extract::State;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::{AircallConfig, AircallInput, Call, CallFilter, Integration};
use super::{integrations, store};
use crate::AppState;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ApiQuery, ValidJson};
use crate::http::pagination::{Page, PageParams, decode_id_cursor, encode_id_cursor, paginate};
use crate::http::problems::ProblemResponse;
use crate::validate::Errors;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_calls))
        .routes(routes!(get_call))
        .routes(routes!(put_aircall, get_aircall))
        .merge(neutral::settings_router())
}

/// The providers' webhooks (public: each authenticates its provider).
pub fn webhooks() -> OpenApiRouter<AppState> {
    aircall::router().merge(neutral::router())
}

/// List calls, newest first.
#[utoipa::path(get, path = "/v1/calls", tag = "telephony", security(("api_key" = [])), params(CallFilter),
    responses((status = 200, body = Page<Call>)))]
async fn list_calls(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<CallFilter>,
) -> ApiResult<Json<Page<Call>>> {
    let page = PageParams {
        limit: f.limit,
        cursor: f.cursor.clone(),
    };
    let limit = page.limit()?;
    let before = page.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, tenant.id, f.contact_id, before, limit + 1).await?;
    Ok(Json(paginate(rows, limit, |c| encode_id_cursor(c.id))))
}

/// Get a call.
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "telephony", security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Call id")),
    responses((status = 200, body = Call), (status = 404, response = ProblemResponse)))]
async fn get_call(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    let mut conn = state.pool.acquire().await?;
    store::get(&mut conn, tenant.id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no call with id {id}")))
}

/// Configure Aircall: the webhook token (required once) and API credentials for insight cards.
#[utoipa::path(put, path = "/v1/integrations/aircall", tag = "telephony", security(("api_key" = [])),
    request_body = AircallInput,
    responses((status = 200, body = AircallConfig), (status = 422, response = ProblemResponse)))]
async fn put_aircall(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<AircallInput>,
) -> ApiResult<Json<AircallConfig>> {
    let mut errors = Errors::new();
    for (name, value) in [
        ("webhook_token", &body.webhook_token),
        ("api_id", &body.api_id),
        ("api_token", &body.api_token),
    ] {
        if value
            .as_deref()
            .is_some_and(|v| v.trim().is_empty() || v.len() > 500)
        {
            errors.add(name, "must be 1 to 500 characters");
        }
    }
    if let Some(url) = &body.api_base_url {
        if let Err(m) = state.egress.check_url(url) {
            errors.add("api_base_url", m);
        }
    }
    errors.finish()?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let mut current = integrations::load(&mut tx, &state.secrets, tenant.id, "aircall")
        .await?
        .unwrap_or_default();
    if let Some(t) = &body.webhook_token {
        current.secrets.insert("webhook_token".into(), t.clone());
    }
    if let Some(t) = &body.api_token {
        current.secrets.insert("api_token".into(), t.clone());
    }
    if let Some(id) = &body.api_id {
        current.settings.insert("api_id".into(), json!(id));
    }
    if let Some(url) = &body.api_base_url {
        current
            .settings
            .insert("api_base_url".into(), json!(url.trim_end_matches('/')));
    }
    if !current.secrets.contains_key("webhook_token") {
        return Err(ApiError::field("webhook_token", "is required"));
    }
    let plain = serde_json::to_vec(&current.secrets).map_err(|e| ApiError::Internal(e.into()))?;
    let sealed = state
        .secrets
        .seal(&plain, &integrations::associated(tenant.id, "aircall"))
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let names: Vec<String> = current.secrets.keys().cloned().collect();
    let updated_at = store::put_integration(
        &mut tx,
        tenant.id,
        "aircall",
        &current.settings,
        &sealed,
        &names,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(integrations::config(&current, Some(updated_at))))
}

/// The Aircall settings, without secret values.
#[utoipa::path(get, path = "/v1/integrations/aircall", tag = "telephony", security(("api_key" = [])),
    responses((status = 200, body = AircallConfig), (status = 404, response = ProblemResponse)))]
async fn get_aircall(
    tenant: TenantContext,
    State(state): State<AppState>,
) -> ApiResult<Json<AircallConfig>> {
    let mut conn = state.pool.acquire().await?;
    let row = store::integration(&mut conn, tenant.id, "aircall")
        .await?
        .ok_or_else(|| ApiError::NotFound("Aircall is not configured".to_owned()))?;
    let i = Integration {
        settings: row.settings.as_object().cloned().unwrap_or_default(),
        secrets: row
            .secret_names
            .into_iter()
            .map(|n| (n, String::new()))
            .collect(),
    };
    Ok(Json(integrations::config(&i, Some(row.updated_at))))
}
