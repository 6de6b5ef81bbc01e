//! Per-tenant telephony settings: `PUT/GET /v1/integrations/aircall`. Secrets (the webhook
//! token, the API token) are sealed like channel secrets and never returned.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::crypto::SecretBox;
use crate::domain::{TenantContext, TenantId};
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::ValidJson;
use crate::validate::Errors;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(put_aircall, get_aircall))
}

/// `PUT /v1/integrations/aircall`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AircallInput {
    /// The token of the Aircall webhook; kept when absent.
    pub webhook_token: Option<String>,
    /// API credentials, to push insight cards.
    pub api_id: Option<String>,
    pub api_token: Option<String>,
    /// Default `https://api.aircall.io`.
    pub api_base_url: Option<String>,
}

/// The stored Aircall settings, without secret values.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AircallConfig {
    pub api_id: Option<String>,
    pub api_base_url: String,
    /// The names of the secrets that are set.
    pub secrets: Vec<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Settings and opened secrets of an integration.
#[derive(Debug, Clone, Default)]
pub struct Integration {
    pub settings: serde_json::Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
}

fn associated(tenant: TenantId, kind: &str) -> Vec<u8> {
    format!("{tenant}/integration/{kind}").into_bytes()
}

/// The integration of this kind with its secrets opened; None when not configured.
pub async fn load(
    conn: &mut PgConnection,
    secrets_box: &SecretBox,
    tenant: TenantId,
    kind: &str,
) -> ApiResult<Option<Integration>> {
    let row: Option<(Value, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT settings, secrets_sealed FROM integrations WHERE tenant_id = $1 AND kind = $2",
    )
    .bind(tenant)
    .bind(kind)
    .fetch_optional(conn)
    .await?;
    let Some((settings, sealed)) = row else {
        return Ok(None);
    };
    let secrets = match sealed {
        Some(bytes) => {
            // An operator's key problem, not the caller's: a clear 503 to retry once fixed.
            let unusable = |e: &dyn std::fmt::Display| {
                tracing::error!(%tenant, kind, error = %e, "an integration's secrets cannot be opened");
                ApiError::Unavailable(format!(
                    "the {kind} integration's secrets cannot be opened: {e}"
                ))
            };
            let plain = secrets_box
                .open(&bytes, &associated(tenant, kind))
                .map_err(|e| unusable(&e))?;
            serde_json::from_slice(&plain).map_err(|e| unusable(&e))?
        }
        None => BTreeMap::new(),
    };
    Ok(Some(Integration {
        settings: settings.as_object().cloned().unwrap_or_default(),
        secrets,
    }))
}

fn config(i: &Integration, updated_at: Option<DateTime<Utc>>) -> AircallConfig {
    AircallConfig {
        api_id: i
            .settings
            .get("api_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        api_base_url: i
            .settings
            .get("api_base_url")
            .and_then(Value::as_str)
            .unwrap_or("https://api.aircall.io")
            .to_owned(),
        secrets: i.secrets.keys().cloned().collect(),
        updated_at,
    }
}

/// Configure Aircall: the webhook token (required once) and API credentials for insight cards.
#[utoipa::path(put, path = "/v1/integrations/aircall", tag = "telephony", security(("api_key" = [])),
    request_body = AircallInput,
    responses((status = 200, body = AircallConfig), (status = 422, body = Problem, content_type = "application/problem+json")))]
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
    let mut tx = state.pool.begin().await?;
    let mut current = load(&mut tx, &state.secrets, tenant.id, "aircall")
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
        .seal(&plain, &associated(tenant.id, "aircall"))
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let names: Vec<String> = current.secrets.keys().cloned().collect();
    let updated_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO integrations (tenant_id, kind, settings, secrets_sealed, secret_names) VALUES ($1, 'aircall', $2, $3, $4)
         ON CONFLICT (tenant_id, kind) DO UPDATE SET settings = EXCLUDED.settings, secrets_sealed = EXCLUDED.secrets_sealed,
            secret_names = EXCLUDED.secret_names, updated_at = now()
         RETURNING updated_at",
    )
    .bind(tenant.id)
    .bind(Value::Object(current.settings.clone()))
    .bind(sealed)
    .bind(&names)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(config(&current, Some(updated_at))))
}

/// The Aircall settings, without secret values.
#[utoipa::path(get, path = "/v1/integrations/aircall", tag = "telephony", security(("api_key" = [])),
    responses((status = 200, body = AircallConfig), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_aircall(
    tenant: TenantContext,
    State(state): State<AppState>,
) -> ApiResult<Json<AircallConfig>> {
    let mut conn = state.pool.acquire().await?;
    let row: Option<(Value, Vec<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT settings, secret_names, updated_at FROM integrations WHERE tenant_id = $1 AND kind = 'aircall'",
    )
    .bind(tenant.id)
    .fetch_optional(&mut *conn)
    .await?;
    let (settings, names, at) =
        row.ok_or_else(|| ApiError::NotFound("Aircall is not configured".to_owned()))?;
    let i = Integration {
        settings: settings.as_object().cloned().unwrap_or_default(),
        secrets: names.into_iter().map(|n| (n, String::new())).collect(),
    };
    Ok(Json(config(&i, Some(at))))
}

/// Re-seals every tenant's integration secrets with the current key (`rapport secrets
/// rotate`); how many rows changed. Nothing is written if one row cannot be opened.
pub async fn reseal_all(conn: &mut PgConnection, secrets_box: &SecretBox) -> anyhow::Result<u64> {
    let rows: Vec<(TenantId, String, Vec<u8>)> = sqlx::query_as(
        "SELECT tenant_id, kind, secrets_sealed FROM integrations
         WHERE secrets_sealed IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut changed = Vec::new();
    for (tenant, kind, sealed) in rows {
        if let Some(resealed) = secrets_box
            .reseal(&sealed, &associated(tenant, &kind))
            .map_err(|e| anyhow::anyhow!("integration {kind} of tenant {tenant}: {e}"))?
        {
            changed.push((tenant, kind, resealed));
        }
    }
    for (tenant, kind, resealed) in &changed {
        sqlx::query(
            "UPDATE integrations SET secrets_sealed = $3 WHERE tenant_id = $1 AND kind = $2",
        )
        .bind(tenant)
        .bind(kind)
        .bind(resealed)
        .execute(&mut *conn)
        .await?;
    }
    Ok(changed.len() as u64)
}
