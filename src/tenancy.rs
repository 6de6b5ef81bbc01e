//! Who is calling: the tenant behind an API key, or an operator with the admin token.
//!
//! The `require_tenant` and `require_admin` middlewares authenticate once per request and put
//! the result in the request's extensions; the [`Tenant`] extractor is the only way a handler
//! gets a [`TenantId`].

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// The id of a tenant: every store function takes one first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
pub struct TenantId(pub Uuid);

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The authenticated tenant of a request, with the defaults its data is normalised with.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Tenant {
    #[sqlx(rename = "tenant_id")]
    pub id: TenantId,
    pub key_id: Uuid,
    pub default_country: String,
    pub default_locale: String,
    pub timezone: String,
}

/// Marks a request authenticated with the operators' admin token.
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// Prefix of every tenant API key.
pub const KEY_PREFIX: &str = "rk_live_";

/// A new API key: 32 random bytes, base64url, behind `rk_live_`.
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The SHA-256 of a key, as stored. Keys carry 256 bits of entropy, so a fast hash suffices.
pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn is_admin_token(state: &AppState, token: &str) -> bool {
    state
        .config
        .admin_token()
        .is_some_and(|admin| bool::from(admin.as_bytes().ct_eq(token.as_bytes())))
}

async fn tenant_for_key(state: &AppState, token: &str) -> Result<Option<Tenant>, ApiError> {
    if !token.starts_with(KEY_PREFIX) {
        return Ok(None);
    }
    let mut conn = state.pool.acquire().await?;
    Ok(crate::tenants::store::authenticate(&mut conn, &hash_api_key(token)).await?)
}

/// Lets through requests carrying a live tenant API key; everything else is 401/403.
pub async fn require_tenant(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let Some(token) = bearer(&parts) else {
        return Err(ApiError::Unauthorized(
            "send your API key as `Authorization: Bearer rk_live_...`".to_owned(),
        ));
    };
    match tenant_for_key(&state, token).await? {
        Some(tenant) => {
            parts.extensions.insert(tenant);
            Ok(next.run(Request::from_parts(parts, body)).await)
        }
        None if is_admin_token(&state, token) => Err(ApiError::Forbidden(
            "the admin token cannot be used on tenant paths; use a tenant API key".to_owned(),
        )),
        None => Err(ApiError::Unauthorized(
            "the API key is unknown or has been revoked".to_owned(),
        )),
    }
}

/// Lets through requests carrying the admin token; the admin API is off while none is set.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    if state.config.admin_token().is_none() {
        return Err(ApiError::Forbidden(
            "the admin API is disabled: set RAPPORT_ADMIN_TOKEN (or admin_token in the \
             configuration file) and restart; the `rapport tenant` and `rapport api-key` \
             commands work without it"
                .to_owned(),
        ));
    }
    let Some(token) = bearer(&parts) else {
        return Err(ApiError::Unauthorized(
            "send the admin token as `Authorization: Bearer <token>`".to_owned(),
        ));
    };
    if is_admin_token(&state, token) {
        parts.extensions.insert(Operator);
        return Ok(next.run(Request::from_parts(parts, body)).await);
    }
    if tenant_for_key(&state, token).await?.is_some() {
        return Err(ApiError::Forbidden(
            "a tenant API key cannot be used on admin paths".to_owned(),
        ));
    }
    Err(ApiError::Unauthorized(
        "the admin token is wrong".to_owned(),
    ))
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Tenant>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "Tenant extractor used on a route without require_tenant"
            ))
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Operator>().copied().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "Operator extractor used on a route without require_admin"
            ))
        })
    }
}
