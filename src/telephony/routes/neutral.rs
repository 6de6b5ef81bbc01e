//! The provider-neutral telephony intake: `POST /webhooks/telephony/{tenant_id}` with
//! `newCall`, `answer` and `hangup` events (fields `callId, direction, from, to, user, cause,
//! answeringNumber`), signed per Standard Webhooks: `webhook-id`, `webhook-timestamp` (within
//! five minutes), `webhook-signature` (`v1,<base64>` HMAC-SHA256 over `id.timestamp.body` with
//! the `whsec_` secret; several space-separated signatures are accepted, for key rotation).
//! Deliveries are deduplicated on `webhook-id`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::integrations;
use crate::AppState;
use crate::domain::{TenantContext, TenantId};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiPath, ValidJson};
use crate::http::problems::ProblemResponse;
use crate::telephony::model::CallUpdate;
use crate::telephony::{calls, store};

/// How far a webhook's timestamp may be from now.
const TOLERANCE_SECS: i64 = 300;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(webhook))
}

pub fn settings_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(put_settings))
}

/// `PUT /v1/integrations/telephony`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TelephonyInput {
    /// `whsec_` followed by 24 to 64 random bytes in base64.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: String,
}

/// The neutral intake is configured (the secret itself is never returned).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TelephonyConfig {
    pub secrets: Vec<String>,
}

/// The key of a `whsec_` secret.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let raw = secret.strip_prefix("whsec_")?;
    let key = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

/// The Standard Webhooks signature `v1,<base64>` of a delivery.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Configure the neutral intake's signing secret.
#[utoipa::path(put, path = "/v1/integrations/telephony", operation_id = "put_telephony_intake", tag = "telephony", security(("api_key" = [])),
    request_body = TelephonyInput,
    responses((status = 200, body = TelephonyConfig), (status = 422, response = ProblemResponse)))]
async fn put_settings(
    tenant: TenantContext,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<TelephonyInput>,
) -> ApiResult<Json<TelephonyConfig>> {
    if secret_key(&body.secret).is_none() {
        return Err(ApiError::field(
            "secret",
            "must be `whsec_` and 24 to 64 bytes in base64",
        ));
    }
    let plain = serde_json::to_vec(&json!({"secret": body.secret}))
        .map_err(|e| ApiError::Internal(e.into()))?;
    let sealed = state
        .secrets
        .seal(
            &plain,
            &crate::telephony::integrations::associated(tenant.id, "telephony"),
        )
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let mut conn = state.pool.acquire().await?;
    store::put_intake_secret(&mut conn, tenant.id, &sealed).await?;
    Ok(Json(TelephonyConfig {
        secrets: vec!["secret".to_owned()],
    }))
}

/// An event of the neutral format.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NeutralEvent {
    /// `newCall`, `answer` or `hangup`.
    pub event: String,
    pub call_id: String,
    /// `in` or `out`.
    pub direction: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The agent (a name, or a list of names).
    #[schema(value_type = Option<Object>)]
    pub user: Option<Value>,
    /// Why the call ended (`normalClearing`, `noAnswer`, `busy`, `cancel`...).
    pub cause: Option<String>,
    pub answering_number: Option<String>,
}

/// What was done with a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntakeResult {
    pub call_id: Option<Uuid>,
    /// True when this `webhook-id` was processed before; nothing changed.
    pub duplicate: bool,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A call event in the neutral format.
#[utoipa::path(post, path = "/webhooks/telephony/{tenant_id}", operation_id = "telephony_intake_webhook", tag = "telephony",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body = NeutralEvent,
    responses((status = 200, body = IntakeResult),
              (status = 400, response = ProblemResponse),
              (status = 401, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn webhook(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<IntakeResult>> {
    let unauthorized = |why: &str| ApiError::Unauthorized(format!("webhook signature: {why}"));
    let id = header(&headers, "webhook-id")
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| unauthorized("webhook-id is missing"))?;
    let timestamp: i64 = header(&headers, "webhook-timestamp")
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| unauthorized("webhook-timestamp is missing"))?;
    if (Utc::now().timestamp() - timestamp).abs() > TOLERANCE_SECS {
        return Err(unauthorized(
            "webhook-timestamp is more than five minutes away",
        ));
    }
    let signatures = header(&headers, "webhook-signature")
        .ok_or_else(|| unauthorized("webhook-signature is missing"))?;
    let tenant = TenantId(tenant_id);
    let mut tx = crate::db::begin(&state.pool).await?;
    let integration = integrations::load(&mut tx, &state.secrets, tenant, "telephony")
        .await?
        .ok_or_else(|| unauthorized("no signature matches"))?;
    let key = integration
        .secrets
        .get("secret")
        .and_then(|s| secret_key(s))
        .ok_or_else(|| unauthorized("no signature matches"))?;
    let expected = sign(&key, id, timestamp, &body);
    let valid = signatures
        .split_whitespace()
        .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())));
    if !valid {
        return Err(unauthorized("no signature matches"));
    }
    let first = store::first_receipt(&mut tx, tenant, id).await?;
    if !first {
        return Ok(Json(IntakeResult {
            call_id: None,
            duplicate: true,
        }));
    }
    let e: NeutralEvent = crate::http::extract::parse_json(&body)?;
    let at: Option<DateTime<Utc>> = DateTime::from_timestamp(timestamp, 0);
    let inbound = match e.direction.as_deref() {
        Some("in") => Some(true),
        Some("out") => Some(false),
        None => None,
        Some(other) => {
            return Err(ApiError::field(
                "direction",
                format!("`{other}` is not `in` or `out`"),
            ));
        }
    };
    let external = match inbound {
        Some(false) => e.to.clone(),
        _ => e.from.clone(),
    };
    let user = match &e.user {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    if e.call_id.is_empty() || e.call_id.len() > 255 {
        return Err(ApiError::field("callId", "must be 1 to 255 characters"));
    }
    let mut update = CallUpdate {
        provider_call_id: e.call_id.clone(),
        inbound,
        external_raw: external,
        user_name: user,
        ..CallUpdate::default()
    };
    match e.event.as_str() {
        "newCall" => {
            update.stage = 1;
            update.started_at = at;
        }
        "answer" => {
            update.stage = 2;
            update.answered_at = at;
        }
        "hangup" => {
            update.stage = 3;
            update.ended_at = at;
            if e.cause.as_deref().is_some_and(|c| c != "normalClearing") {
                update.missed_reason = e.cause.clone();
            }
        }
        other => {
            return Err(ApiError::field(
                "event",
                format!("`{other}` is not newCall, answer or hangup"),
            ));
        }
    }
    let ctx = crate::tenants::store::context(&mut tx, tenant)
        .await?
        .ok_or_else(|| unauthorized("no signature matches"))?;
    let call = calls::apply(
        &mut tx,
        &ctx,
        "neutral",
        &update,
        &state.send_options().await?,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(IntakeResult {
        call_id: Some(call.id),
        duplicate: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signs_like_the_specification() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
