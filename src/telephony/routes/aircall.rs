//! Aircall webhooks: `POST /webhooks/aircall/{tenant_id}`, envelope
//! `{resource, event, timestamp, token, data}`. The token is compared in constant time with
//! the tenant's; a wrong one is a 401 and stores nothing. The answer comes at once (Aircall
//! waits 5 s): the work is a few indexed statements.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::integrations;
use crate::AppState;
use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiPath;
use crate::http::problems::ProblemResponse;
use crate::telephony::calls;
use crate::telephony::model::{CallDirection, CallStatus, CallUpdate};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(webhook))
}

/// The call events Rapport reads; others of the `call` resource are acknowledged and ignored.
const CALL_EVENTS: &[&str] = &[
    "call.created",
    "call.ringing_on_agent",
    "call.agent_declined",
    "call.answered",
    "call.transferred",
    "call.external_transferred",
    "call.unsuccessful_transfer",
    "call.hungup",
    "call.ended",
    "call.hold",
    "call.unhold",
    "call.ivr_option_selected",
    "call.comm_assets_generated",
    "call.voicemail_left",
    "call.assigned",
    "call.archived",
    "call.tagged",
    "call.untagged",
    "call.commented",
];

/// What was done with a webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookResult {
    /// The call's id in Rapport.
    pub call_id: Option<Uuid>,
}

fn unix(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v.and_then(Value::as_i64)
        .filter(|s| *s > 0)
        .and_then(|s| DateTime::from_timestamp(s, 0))
}

/// The facts of an Aircall call payload.
pub fn update_from(event: &str, data: &Value) -> Result<CallUpdate, ApiError> {
    let id = match data.get("id") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ApiError::field("data.id", "is required")),
    };
    let status = data.get("status").and_then(Value::as_str).unwrap_or("");
    let answered_at = unix(data.get("answered_at"));
    let ended_at = unix(data.get("ended_at"));
    let stage = if ended_at.is_some()
        || status == "done"
        || matches!(event, "call.hungup" | "call.ended" | "call.voicemail_left")
    {
        3
    } else if answered_at.is_some() || status == "answered" || event == "call.answered" {
        2
    } else {
        1
    };
    let user = data.get("user").filter(|u| u.is_object());
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Ok(CallUpdate {
        provider_call_id: id,
        inbound: data
            .get("direction")
            .and_then(Value::as_str)
            .map(|d| d == "inbound"),
        external_raw: text(data.get("raw_digits")),
        user_name: user.and_then(|u| text(u.get("name"))),
        user_email: user.and_then(|u| text(u.get("email"))),
        stage,
        started_at: unix(data.get("started_at")),
        answered_at,
        ended_at,
        duration_secs: data
            .get("duration")
            .and_then(Value::as_i64)
            .and_then(|d| i32::try_from(d).ok())
            .filter(|d| *d > 0),
        missed_reason: text(data.get("missed_call_reason")),
        recording_url: text(data.get("recording")),
        voicemail_url: text(data.get("voicemail")),
        tags: data.get("tags").filter(|t| t.is_array()).cloned(),
        comments: data.get("comments").filter(|c| c.is_array()).cloned(),
    })
}

/// An Aircall webhook.
#[utoipa::path(post, path = "/webhooks/aircall/{tenant_id}", operation_id = "aircall_webhook", tag = "telephony",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = Object, content_type = "application/json", description = "Aircall's envelope {resource, event, timestamp, token, data}"),
    responses((status = 200, body = WebhookResult),
              (status = 400, response = ProblemResponse),
              (status = 401, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn webhook(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    body: Bytes,
) -> ApiResult<Json<WebhookResult>> {
    let envelope: Value = crate::http::extract::parse_json(&body)?;
    let unauthorized =
        || ApiError::Unauthorized("the webhook token is missing or wrong".to_owned());
    let given = envelope
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(unauthorized)?;
    let tenant = TenantId(tenant_id);
    let mut tx = crate::db::begin(&state.pool).await?;
    let integration = integrations::load(&mut tx, &state.secrets, tenant, "aircall")
        .await?
        .ok_or_else(unauthorized)?;
    let expected = integration
        .secrets
        .get("webhook_token")
        .ok_or_else(unauthorized)?;
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(unauthorized());
    }
    let resource = envelope
        .get("resource")
        .and_then(Value::as_str)
        .unwrap_or("");
    let event = envelope.get("event").and_then(Value::as_str).unwrap_or("");
    if resource != "call" || !CALL_EVENTS.contains(&event) {
        // Aircall disables a webhook whose deliveries keep failing, and a webhook subscribed
        // to more events than Rapport reads (`user.connected`, `number.closed`...) is common:
        // those are accepted and ignored.
        tracing::debug!(%tenant, resource, event, "Aircall event ignored");
        return Ok(Json(WebhookResult { call_id: None }));
    }
    let data = envelope
        .get("data")
        .filter(|d| d.is_object())
        .ok_or_else(|| ApiError::field("data", "is required"))?;
    let update = update_from(event, data)?;
    let ctx = crate::tenants::store::context(&mut tx, tenant).await?;
    let ctx = ctx.ok_or_else(unauthorized)?;
    let call = calls::apply(
        &mut tx,
        &ctx,
        "aircall",
        &update,
        &state.send_options().await?,
    )
    .await?;
    // When a known contact calls in, the agent gets the contact card before answering.
    let has_api = integration.settings.contains_key("api_id")
        && integration.secrets.contains_key("api_token");
    if let (true, true, Some(contact)) = (
        has_api,
        call.direction == Some(CallDirection::Inbound) && call.status != CallStatus::Ended,
        call.contact_id,
    ) {
        let card = crate::telephony::insight::InsightCard {
            call_id: update.provider_call_id.clone(),
            contact_id: contact,
        };
        crate::jobs::enqueue(&mut tx, tenant, &update.provider_call_id, &card).await?;
    }
    tx.commit().await?;
    Ok(Json(WebhookResult {
        call_id: Some(call.id),
    }))
}
