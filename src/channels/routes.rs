//! `/v1/channels`: each tenant's provider, settings and secrets per channel.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::settings::{self, ChannelConfig, ChannelInput};
use crate::AppState;
use crate::domain::Channel;
use crate::domain::TenantContext;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ValidJson};
use crate::http::pagination::Page;
use crate::http::problems::ProblemResponse;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_channels))
        .routes(routes!(put_channel, get_channel, delete_channel))
}

fn channel(raw: &str) -> ApiResult<Channel> {
    Channel::parse(raw).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no channel `{raw}`; the channels are email, sms and viber"
        ))
    })
}

/// Configure a channel's provider. Secrets are sealed at rest and never returned; omit them to
/// keep the stored ones.
#[utoipa::path(put, path = "/v1/channels/{channel}", tag = "channels",
    security(("api_key" = [])),
    params(("channel" = String, Path, description = "email, sms or viber")),
    request_body = ChannelInput,
    responses((status = 200, body = ChannelConfig),
              (status = 404, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn put_channel(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ValidJson(body): ValidJson<ChannelInput>,
) -> ApiResult<Json<ChannelConfig>> {
    let channel = channel(&name)?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let config = settings::put(
        &mut tx,
        &state.secrets,
        &state.egress,
        tenant.id,
        channel,
        &body,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(with_webhook_url(&state, tenant.id, config).await?))
}

/// The configuration with the URL its provider's webhooks must call.
async fn with_webhook_url(
    state: &AppState,
    tenant: crate::domain::TenantId,
    mut config: ChannelConfig,
) -> ApiResult<ChannelConfig> {
    let signer = state.links.get(&state.pool).await?;
    config.webhook_url = super::webhook_url(
        &state.config.public_url,
        signer,
        tenant,
        config.channel,
        &config.provider,
    );
    Ok(config)
}

/// A channel's configuration (`log` when none is stored), without secret values.
#[utoipa::path(get, path = "/v1/channels/{channel}", tag = "channels",
    security(("api_key" = [])),
    params(("channel" = String, Path, description = "email, sms or viber")),
    responses((status = 200, body = ChannelConfig), (status = 404, response = ProblemResponse)))]
async fn get_channel(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ChannelConfig>> {
    let channel = channel(&name)?;
    let mut conn = state.pool.acquire().await?;
    let config = settings::get(&mut conn, tenant.id, channel).await?;
    drop(conn);
    Ok(Json(with_webhook_url(&state, tenant.id, config).await?))
}

/// Every channel's configuration.
#[utoipa::path(get, path = "/v1/channels", tag = "channels",
    security(("api_key" = [])),
    responses((status = 200, body = Page<ChannelConfig>)))]
async fn list_channels(
    tenant: TenantContext,
    State(state): State<AppState>,
) -> ApiResult<Json<Page<ChannelConfig>>> {
    let mut conn = state.pool.acquire().await?;
    let mut data = Vec::new();
    for channel in [Channel::Email, Channel::Sms, Channel::Viber] {
        let config = settings::get(&mut conn, tenant.id, channel).await?;
        data.push(with_webhook_url(&state, tenant.id, config).await?);
    }
    Ok(Json(Page {
        data,
        next_cursor: None,
    }))
}

/// Remove a channel's configuration: it goes back to the `log` provider.
#[utoipa::path(delete, path = "/v1/channels/{channel}", tag = "channels",
    security(("api_key" = [])),
    params(("channel" = String, Path, description = "email, sms or viber")),
    responses((status = 204, description = "Removed"), (status = 404, response = ProblemResponse)))]
async fn delete_channel(
    tenant: TenantContext,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let channel = channel(&name)?;
    let mut conn = state.pool.acquire().await?;
    super::store::set_pacing(&mut conn, tenant.id, channel, None).await?;
    if super::store::delete(&mut conn, tenant.id, channel).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "the {} channel has no stored configuration",
            channel.as_str()
        )))
    }
}
