//! What providers call back with: `POST /webhooks/{twilio|infobip|viber}/{tenant_id}`, one URL
//! per provider for delivery receipts and customers' messages alike. Each is authenticated
//! (Twilio's and Viber's signatures; for Infobip, which does not sign, a signed token in the
//! URL we gave it); a bad signature is a 401 and changes nothing. Receipts move a message
//! forward only, so duplicates and late arrivals change nothing; customers' messages are
//! filed once per provider message id (`crate::inbound`).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::channels::settings::{self, Resolved};
use crate::contacts::store as contacts;
use crate::domain::TenantId;
use crate::domain::{Channel, ConsentStatus, Purpose as ConsentPurpose};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::ApiPath;
use crate::http::problems::ProblemResponse;
use crate::inbound::model::{Inbound, Media, Sender};
use crate::inbound::receive;
use crate::messages::store::{self as messages, DeliveryReport};
use crate::signing::Purpose;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(twilio))
        .routes(routes!(infobip))
        .routes(routes!(viber))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(email))
                // Mail carries attachments: a larger limit than the API's, still bounded.
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::inbound::email::MAX_EMAIL_BYTES,
                )),
        )
}

fn unauthorized() -> ApiError {
    ApiError::Unauthorized("the webhook's signature is missing or wrong".to_owned())
}

async fn provider_config(
    state: &AppState,
    tenant: TenantId,
    channel: Channel,
    provider: &str,
) -> ApiResult<Resolved> {
    let mut conn = state.pool.acquire().await?;
    match settings::resolve(&mut conn, &state.secrets, tenant, channel).await {
        Ok(Some(config)) if config.provider == provider => Ok(config),
        // The same answer whether or not the tenant exists or uses this provider: a 401 must
        // not tell a stranger which tenant ids are real.
        Ok(_) => Err(unauthorized()),
        Err(settings::ResolveError::Database(e)) => Err(e.into()),
        Err(e) => {
            tracing::error!(%tenant, error = %e, "a provider's secrets cannot be opened");
            Err(ApiError::Unavailable(format!(
                "the {} channel's secrets cannot be opened: {e}",
                channel.as_str()
            )))
        }
    }
}

/// Twilio's signature: base64(HMAC-SHA1(auth token, URL + each POST parameter sorted by name
/// as name + value)).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_owned();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Twilio status callbacks (`MessageSid`, `MessageStatus`, `ErrorCode`) and inbound messages
/// (`SmsStatus=received`, `From`, `To`, `Body`, `NumMedia`, `MediaUrl0`...), form-encoded and
/// signed with `X-Twilio-Signature`. An inbound message is answered with empty TwiML.
#[utoipa::path(post, path = "/webhooks/twilio/{tenant_id}", tag = "webhooks",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = String, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "An inbound message, filed (empty TwiML)", content_type = "text/xml"),
              (status = 204, description = "A receipt, applied (or nothing to change)"),
              (status = 401, response = ProblemResponse),
              (status = 422, response = ProblemResponse)))]
async fn twilio(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let tenant = TenantId(tenant_id);
    let config = provider_config(&state, tenant, Channel::Sms, "twilio").await?;
    let token = config.secrets.get("auth_token").ok_or_else(unauthorized)?;
    let url = config
        .settings
        .get("status_callback_url")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "{}/webhooks/twilio/{tenant}",
                state.config.public_url.trim_end_matches('/')
            )
        });
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let given = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let expected = twilio_signature(token, &url, &params);
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(unauthorized());
    }
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let sid = get("MessageSid")
        .or(get("SmsSid"))
        .ok_or_else(|| ApiError::field("MessageSid", "is required"))?;
    if get("SmsStatus") == Some("received") || get("MessageStatus") == Some("received") {
        let from = get("From").ok_or_else(|| ApiError::field("From", "is required"))?;
        let count = get("NumMedia")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
            .min(10);
        let media = (0..count)
            .filter_map(|i| {
                Some(Media {
                    url: get(&format!("MediaUrl{i}"))?.to_owned(),
                    content_type: get(&format!("MediaContentType{i}")).map(str::to_owned),
                })
            })
            .collect();
        let message = Inbound {
            channel: Channel::Sms,
            provider: "twilio",
            provider_message_id: sid.to_owned(),
            sender: Sender::Phone(from.to_owned()),
            recipient: get("To").map(str::to_owned),
            text: get("Body").unwrap_or_default().to_owned(),
            media,
            ..Inbound::chat()
        };
        file(&state, tenant, &[message]).await?;
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"))],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
        )
            .into_response());
    }
    let receipt = match get("MessageStatus")
        .or(get("SmsStatus"))
        .unwrap_or_default()
    {
        "delivered" => DeliveryReport::Delivered,
        "read" => DeliveryReport::Opened,
        status @ ("undelivered" | "failed") => {
            DeliveryReport::Undelivered(match get("ErrorCode") {
                Some(code) => format!("twilio {code}: {status}"),
                None => format!("twilio: {status}"),
            })
        }
        _ => return Ok(StatusCode::NO_CONTENT.into_response()),
    };
    Ok(apply(&state, tenant, sid, &receipt).await?.into_response())
}

/// Files customers' messages in one transaction; a field a provider left out is a 422 that
/// names it, and nothing is written.
async fn file(state: &AppState, tenant: TenantId, messages: &[Inbound]) -> ApiResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let opts = state.send_options().await?;
    let mut tx = crate::db::begin(&state.pool).await?;
    let ctx = crate::tenants::store::context(&mut tx, tenant)
        .await?
        .ok_or_else(unauthorized)?;
    for m in messages {
        receive::receive(&mut tx, &ctx, m, &opts).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn apply(
    state: &AppState,
    tenant: TenantId,
    provider_id: &str,
    receipt: &DeliveryReport,
) -> ApiResult<StatusCode> {
    let mut tx = crate::db::begin(&state.pool).await?;
    messages::apply_receipt(&mut tx, tenant, provider_id, receipt).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The token Infobip carries back in the notify URL.
#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Infobip delivery reports (`{"results": [{messageId, status: {groupName, description}}]}`),
/// Viber seen reports (`seenAt`), and customers' messages: inbound SMS (`{messageId, from, to,
/// text}`) and Viber (`{messageId, from, to, integrationType: "VIBER", message: {type, text,
/// url}}`). Authenticated by the signed token of the URL Rapport gives Infobip (the channel's
/// `webhook_url`).
#[utoipa::path(post, path = "/webhooks/infobip/{tenant_id}", tag = "webhooks",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("token" = String, Query, description = "The signed token of the notify URL")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 204, description = "Applied (or nothing to change)"),
              (status = 401, response = ProblemResponse)))]
async fn infobip(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    Query(query): Query<TokenQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let signer = state.links.get(&state.pool).await?;
    let claims = query
        .token
        .as_deref()
        .and_then(|t| signer.verify(t, Purpose::Webhook))
        .ok_or_else(unauthorized)?;
    if claims.tenant != tenant_id {
        return Err(unauthorized());
    }
    let report: Value = crate::http::extract::parse_json(&body)?;
    let results = report
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::field("results", "is required"))?;
    let tenant = TenantId(tenant_id);
    let (incoming, reports): (Vec<&Value>, Vec<&Value>) =
        results.iter().partition(|r| is_infobip_inbound(r));
    let incoming = incoming
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            infobip_inbound(r)
                .map_err(|m| ApiError::field(format!("results[{i}].{m}"), "is required"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    file(&state, tenant, &incoming).await?;
    let mut tx = crate::db::begin(&state.pool).await?;
    for r in reports {
        let Some(id) = r.get("messageId").and_then(Value::as_str) else {
            continue;
        };
        let group = r
            .pointer("/status/groupName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let receipt = if r.get("seenAt").is_some_and(|v| !v.is_null()) {
            DeliveryReport::Opened
        } else {
            match group {
                "DELIVERED" => DeliveryReport::Delivered,
                "UNDELIVERABLE" | "EXPIRED" | "REJECTED" => {
                    let why = r
                        .pointer("/error/description")
                        .or_else(|| r.pointer("/status/description"))
                        .and_then(Value::as_str)
                        .unwrap_or(group);
                    DeliveryReport::Undelivered(format!("infobip: {why}"))
                }
                _ => continue,
            }
        };
        messages::apply_receipt(&mut tx, tenant, id, &receipt).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A customer's email, raw (RFC 5322 / MIME, `Content-Type: message/rfc822`), as a mail server
/// pipes it (Postfix: `curl --data-binary @-`) or an inbound mail service forwards it.
/// Authenticated with HTTP Basic: any user name, the password the email channel's
/// `inbound_secret`. At most 25 MiB.
#[utoipa::path(post, path = "/webhooks/email/{tenant_id}", tag = "webhooks",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = String, content_type = "message/rfc822"),
    responses((status = 204, description = "Filed (or seen before)"),
              (status = 401, response = ProblemResponse),
              (status = 413, response = ProblemResponse),
              (status = 415, response = ProblemResponse),
              (status = 422, response = ProblemResponse)),
    security(("email_basic" = [])))]
async fn email(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let tenant = TenantId(tenant_id);
    let secret = {
        let mut conn = state.pool.acquire().await?;
        match settings::resolve(&mut conn, &state.secrets, tenant, Channel::Email).await {
            Ok(Some(config)) => config.secrets.get("inbound_secret").cloned(),
            Ok(None) => None,
            Err(settings::ResolveError::Database(e)) => return Err(e.into()),
            Err(e) => {
                tracing::error!(%tenant, error = %e, "the email channel's secrets cannot be opened");
                return Err(ApiError::Unavailable(format!(
                    "the email channel's secrets cannot be opened: {e}"
                )));
            }
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(_, password)| password.to_owned())
        });
    match (secret, given) {
        (Some(secret), Some(given)) if bool::from(secret.as_bytes().ct_eq(given.as_bytes())) => {}
        _ => return Err(unauthorized()),
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("message/rfc822")
    {
        return Err(ApiError::UnsupportedMediaType(
            "send the raw message as message/rfc822".to_owned(),
        ));
    }
    let message = crate::inbound::email::parse(&body, state.config.attachment_max_bytes)
        .map_err(|e| ApiError::field("body", e.to_string()))?;
    file(&state, tenant, &[message]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An Infobip result that is a customer's message, not a report about ours.
fn is_infobip_inbound(r: &Value) -> bool {
    r.get("status").is_none()
        && r.get("seenAt").is_none()
        && (r.get("text").is_some() || r.get("message").is_some_and(Value::is_object))
}

/// A customer's SMS or Viber message as Infobip forwards it; the missing field's name if one
/// is missing.
fn infobip_inbound(r: &Value) -> Result<Inbound, &'static str> {
    let id = r
        .get("messageId")
        .and_then(Value::as_str)
        .ok_or("messageId")?;
    let from = r.get("from").and_then(Value::as_str).ok_or("from")?;
    let viber = r.get("integrationType").and_then(Value::as_str) == Some("VIBER")
        || r.get("message").is_some_and(Value::is_object);
    let (text, media) = if viber {
        let message = r.get("message").ok_or("message")?;
        let text = message
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let media = message
            .get("url")
            .and_then(Value::as_str)
            .map(|url| Media {
                url: url.to_owned(),
                content_type: message
                    .get("type")
                    .and_then(Value::as_str)
                    .map(str::to_ascii_lowercase),
            })
            .into_iter()
            .collect();
        (text, media)
    } else {
        (
            r.get("text").and_then(Value::as_str).unwrap_or_default(),
            Vec::new(),
        )
    };
    Ok(Inbound {
        channel: if viber { Channel::Viber } else { Channel::Sms },
        provider: "infobip",
        provider_message_id: id.to_owned(),
        sender: Sender::Phone(from.to_owned()),
        recipient: r.get("to").and_then(Value::as_str).map(str::to_owned),
        text: text.to_owned(),
        media,
        ..Inbound::chat()
    })
}

/// Viber bot callbacks (`delivered`, `seen`, `failed`, `unsubscribed`, `message`...), signed
/// with `X-Viber-Content-Signature` (hex HMAC-SHA256 of the body with the auth token). A
/// `message` is a customer writing to the bot: `sender.id`, `message.text`, `message.media`.
#[utoipa::path(post, path = "/webhooks/viber/{tenant_id}", tag = "webhooks",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "Applied (or nothing to change)"),
              (status = 401, response = ProblemResponse)))]
async fn viber(
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let tenant = TenantId(tenant_id);
    let config = provider_config(&state, tenant, Channel::Viber, "viber").await?;
    let token = config.secrets.get("auth_token").ok_or_else(unauthorized)?;
    let given = headers
        .get("x-viber-content-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex::decode(v.trim()).ok())
        .ok_or_else(unauthorized)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(&body);
    mac.verify_slice(&given).map_err(|_| unauthorized())?;
    let event: Value = crate::http::extract::parse_json(&body)?;
    let kind = event.get("event").and_then(Value::as_str).unwrap_or("");
    let message_token = event.get("message_token").map(|t| match t {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let receipt = match kind {
        "delivered" => Some(DeliveryReport::Delivered),
        "seen" => Some(DeliveryReport::Opened),
        "failed" => Some(DeliveryReport::Undelivered(format!(
            "viber: {}",
            event
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("failed")
        ))),
        _ => None,
    };
    if kind == "message" {
        let sender = event
            .pointer("/sender/id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::field("sender.id", "is required"))?;
        let token = message_token.ok_or_else(|| ApiError::field("message_token", "is required"))?;
        let message = event.get("message");
        let text = message
            .and_then(|m| m.get("text"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let media = message
            .and_then(|m| m.get("media"))
            .and_then(Value::as_str)
            .map(|url| Media {
                url: url.to_owned(),
                content_type: message
                    .and_then(|m| m.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            })
            .into_iter()
            .collect();
        let inbound = Inbound {
            channel: Channel::Viber,
            provider: "viber",
            provider_message_id: token,
            sender: Sender::ViberUser(sender.to_owned()),
            recipient: None,
            text: text.to_owned(),
            media,
            ..Inbound::chat()
        };
        file(&state, tenant, &[inbound]).await?;
    } else if let (Some(receipt), Some(id)) = (receipt, message_token) {
        apply(&state, tenant, &id, &receipt).await?;
    } else if kind == "unsubscribed" {
        if let Some(user) = event.get("user_id").and_then(Value::as_str) {
            let mut tx = crate::db::begin(&state.pool).await?;
            let ids = contacts::ids_by_viber_id(&mut tx, tenant, user).await?;
            for id in ids {
                for purpose in [ConsentPurpose::Marketing, ConsentPurpose::Transactional] {
                    contacts::set_consent(
                        &mut tx,
                        tenant,
                        id,
                        Channel::Viber,
                        purpose,
                        ConsentStatus::OptedOut,
                        "viber unsubscribed",
                        None,
                    )
                    .await?;
                }
            }
            tx.commit().await?;
        }
    }
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A published test vector of Twilio's request validation (a voice webhook).
    #[test]
    fn twilio_signature_matches_a_published_vector() {
        let params = [
            ("ToState", "California"),
            ("CalledState", "California"),
            ("Direction", "inbound"),
            ("FromState", "CA"),
            ("AccountSid", "ACba8bc05eacf94afdae398e642c9cc32d"),
            ("Caller", "+14153595711"),
            ("CallerZip", "94108"),
            ("CallerCountry", "US"),
            ("From", "+14153595711"),
            ("FromCity", "SAN FRANCISCO"),
            ("CallerCity", "SAN FRANCISCO"),
            ("To", "+14157669926"),
            ("FromZip", "94108"),
            ("FromCountry", "US"),
            ("ToCity", ""),
            ("CallStatus", "ringing"),
            ("CalledCity", ""),
            ("CallerState", "CA"),
            ("CalledZip", ""),
            ("ToZip", ""),
            ("ToCountry", "US"),
            ("CallSid", "CA136d09cd59a3c0ec8dbff44da5c03f31"),
            ("CalledCountry", "US"),
            ("Called", "+14157669926"),
            ("ApiVersion", "2010-04-01"),
            ("ApplicationSid", "AP44efecad51364e80b133bb7c07eb8204"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let sig = twilio_signature(
            "2bd9e9638872de601313dc77410d3b23",
            "http://twiliotests.heroku.com/validate/voice",
            &params,
        );
        assert_eq!(sig, "oVb2kXoVy8GEfwBDjR8bk/ZZ6eA=");
    }
}
